"""Model shapes, parameter counts for named sizes, scan / remat / bfloat16 equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax.train_state  # noqa: F401  (turns off eager variable sharding, as the trainer does)
from vlm_jax.models.text import TextConfig, TextEncoder
from vlm_jax.models.two_towers import TwoTowers
from vlm_jax.models.layers import SIZES
from vlm_jax.models.vit import ViT, ViTConfig


def num_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def expected_vit_params(size: str, patch: int, image: int, pool: str) -> int:
    """Independent count: patch embedding, learned posemb, cls token, blocks, final norm, pooling."""
    width, depth, mlp, _ = SIZES[size]
    tokens = (image // patch) ** 2 + (pool == "tok")
    block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    count = patch * patch * 3 * width + width + tokens * width + depth * block + 2 * width
    if pool == "tok":
        count += width
    if pool == "map":  # probe + attention + norm + MLP
        count += width + 4 * (width * width + width) + 2 * width + (width * mlp + mlp) + (mlp * width + width)
    return count


def test_vit_b16_class_token_parameter_count():
    model = nnx.eval_shape(lambda: ViT(ViTConfig("B/16", image_size=224, pool="tok"), nnx.Rngs(0)))
    assert num_params(model) == 85_798_656


@pytest.mark.slow
@pytest.mark.parametrize("variant,image,pool", [
    ("Ti/16", 224, "tok"), ("S/16", 224, "gap"), ("B/32", 224, "map"), ("L/14", 224, "tok"),
    ("So400m/14", 224, "map"), ("H/14", 224, "gap"), ("g/14", 224, "tok")])
def test_named_sizes_shapes_and_counts(variant, image, pool):
    size, patch = variant.split("/")
    config = ViTConfig(variant, image_size=image, pool=pool)
    model = nnx.eval_shape(lambda: ViT(config, nnx.Rngs(0)))
    assert num_params(model) == expected_vit_params(size, int(patch), image, pool)
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, image, image, 3), jnp.float32))
    assert out.shape == (2, SIZES[size][0])


def test_unknown_size_and_bad_variant_fail_with_clear_message():
    with pytest.raises(ValueError, match="unknown model size 'Z'"):
        ViT(ViTConfig("Z/16"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="must look like 'B/16'"):
        ViT(ViTConfig("B16"), nnx.Rngs(0))


def tiny_vit(**kw):
    defaults = dict(variant="mu/8", image_size=32, depth=3, width=32, num_heads=2, mlp_dim=64)
    return ViTConfig(**{**defaults, **kw})


def stack_blocks(blocks_state):
    """Per-layer block params {0: tree, 1: tree, ...} -> one tree with a leading layer axis."""
    layers = [blocks_state[i] for i in sorted(blocks_state)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["map", "gap", "tok"])
def test_scan_over_layers_matches_python_loop(pool):
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    loop = ViT(tiny_vit(pool=pool), nnx.Rngs(0))
    scanned = ViT(tiny_vit(pool=pool, scan=True), nnx.Rngs(0))
    loop_params = nnx.to_pure_dict(nnx.state(loop))
    scanned_params = {**loop_params, "encoder": {**loop_params["encoder"],
                                                 "blocks": stack_blocks(loop_params["encoder"]["blocks"])}}
    nnx.update(scanned, scanned_params)
    np.testing.assert_allclose(scanned(x), loop(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing_numerically(policy):
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain, remat = ViT(tiny_vit(), nnx.Rngs(0)), ViT(tiny_vit(remat=policy, scan=False), nnx.Rngs(0))

    def loss(model):
        return jnp.sum(model(x) ** 2)

    np.testing.assert_allclose(nnx.grad(loss)(remat)["patch_embed"]["kernel"][...],
                               nnx.grad(loss)(plain)["patch_embed"]["kernel"][...], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_is_close():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    f32, bf16 = ViT(tiny_vit(), nnx.Rngs(0)), ViT(tiny_vit(dtype=jnp.bfloat16), nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert bf16(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(bf16(x)), f32(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("pool", ["last", "first", "mean"])
def test_text_encoder_pooling_shapes(pool):
    config = TextConfig("mu", vocab_size=50, max_len=7, pool=pool, depth=2, width=16, num_heads=2, mlp_dim=32)
    tokens = jnp.arange(14).reshape(2, 7) % 50
    assert TextEncoder(config, nnx.Rngs(0))(tokens).shape == (2, 16)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_two_towers_embeddings_are_normalised_with_loss_specific_init(loss):
    text = TextConfig("mu", vocab_size=50, max_len=7, depth=1)
    model = TwoTowers(tiny_vit(), text, 24, loss, nnx.Rngs(0))
    zimg, ztxt, log_scale, bias = model(jnp.ones((3, 32, 32, 3)), jnp.ones((3, 7), jnp.int32))
    assert zimg.shape == ztxt.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
    if loss == "sigmoid":
        assert np.isclose(np.exp(log_scale), 10.0) and bias == -10.0
    else:
        assert np.isclose(np.exp(log_scale), 1 / 0.07, rtol=1e-5) and bias is None


def test_uint8_pixels_are_mapped_to_minus_one_one_on_device():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    vit = ViT(tiny_vit(), nnx.Rngs(0))
    np.testing.assert_allclose(vit(jnp.asarray(pixels)), vit(jnp.asarray(pixels / 127.5 - 1, jnp.float32)),
                               rtol=1e-5, atol=1e-5)


def test_clip_architecture_vit_keeps_its_class_token_out_of_patch_outputs():
    """model.arch "clip": a class token whatever the pool; pool "none" (decoders, VLMs) passes the patch tokens on,
    the class token having taken part in attention; the CLIP ViT has ln_pre and no patch bias."""
    config = ViTConfig(variant="mu/8", image_size=16, pool="none", cls_token=True, pre_norm=True, patch_bias=False,
                       act="quick_gelu", norm_eps=1e-5)
    vit = ViT(config, nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    assert vit(images).shape == (2, 4, SIZES["mu"][0])
    assert vit.posemb.shape == (5, SIZES["mu"][0]) and vit.cls_token.shape == (SIZES["mu"][0],)
    assert not hasattr(vit.patch_embed, "bias") or vit.patch_embed.bias is None
    tok = ViT(ViTConfig(variant="mu/8", image_size=16, pool="tok", pre_norm=True, patch_bias=False, act="quick_gelu",
                        norm_eps=1e-5), nnx.Rngs(0))
    nnx.update(tok, nnx.state(vit, nnx.Param))  # the same parameters: pool "tok" reads the class token
    assert vit.encoder.ln_final.epsilon == 1e-5 and tok(images).shape == (2, SIZES["mu"][0])


@pytest.mark.parametrize("causal", [False, True])
def test_text_eos_pooling_reads_the_first_eos(causal):
    """pool "eos" (CLIP): the first EOS token's output; with a causal tower the tokens after it change nothing."""
    config = TextConfig(size="mu", vocab_size=20, max_len=6, pool="eos", causal=causal, eos_id=1)
    text = TextEncoder(config, nnx.Rngs(0))
    tokens = jnp.array([[5, 6, 1, 0, 0, 0], [5, 6, 1, 7, 8, 1]])
    pooled = np.asarray(text(tokens))
    assert (np.abs(pooled[0] - pooled[1]).max() < 1e-6) == causal
