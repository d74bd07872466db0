"""Token reduction in training: the image tower's patch dropout (model.image.patch_dropout) and image-token
dropout before a decoder (model.image_token_dropout). Evaluation keeps every token; each example keeps its own
random subset of a fixed size, drawn from the step's key (the run's seed folded with the step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax.train_state  # noqa: F401  (turns off eager variable sharding, as the trainer does)
from vlm_jax.config import ConfigError, load_config
from vlm_jax.microbatch import cached_embedding_grads
from vlm_jax.models.token_dropout import drop_tokens, kept_count
from vlm_jax.models.vit import ViT, ViTConfig
from vlm_jax.models.vlm import drop_image_positions
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, run_key_data, step_rng

from test_captioning import captioning_config
from test_train_step import history_of, make_batch, run_steps, setup, tiny_config
from test_vlm import IMAGE_TOKENS, examples, packed_rows, unpacked_rows, vlm_config

PATCHES = 16  # 16-px images in 4-px patches


def tiny_vit(**kw) -> ViTConfig:
    defaults = dict(variant="mu/4", image_size=16, depth=1, width=32, num_heads=2, mlp_dim=64)
    return ViTConfig(**{**defaults, **kw})


def pixels(batch=4, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, 16, 16, 3), minval=-1, maxval=1)


def indexed_tokens(batch: int, tokens: int) -> jax.Array:
    """[B, N, 2] tokens whose features are their own index: what survives a dropout names itself."""
    return jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.float32)[None, :, None], (batch, tokens, 2))


def kept_sets(x_BxKx2: jax.Array) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in row[:, 0]) for row in np.asarray(x_BxKx2)]


def step_key(seed: int, step: int) -> jax.Array:
    """The key a train step's patch dropout draws: `task.loss(..., nnx.Rngs(step_rng(state)))`, then the ViT's
    `rngs.dropout()`."""
    state = {"rng": run_key_data(jnp.uint32(seed)), "step": jnp.int32(step)}
    return nnx.Rngs(step_rng(state)).dropout()


# -- the image tower ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pool", ["map", "gap", "tok"])
def test_evaluation_keeps_every_token_bitwise(pool):
    plain, dropping = ViT(tiny_vit(pool=pool), nnx.Rngs(0)), ViT(tiny_vit(pool=pool, patch_dropout=0.5), nnx.Rngs(0))
    x = pixels()
    np.testing.assert_array_equal(np.asarray(dropping(x)), np.asarray(plain(x)))
    trained = dropping(x, nnx.Rngs(1))  # training: fewer tokens, same output shape
    assert trained.shape == plain(x).shape and not np.allclose(trained, plain(x))


def test_kept_tokens_are_a_per_example_random_subset_with_the_class_token():
    batch, rate = 8, 0.5
    out = drop_tokens(indexed_tokens(batch, 1 + PATCHES), jax.random.key(0), rate, always_keep=1)
    keep = kept_count(PATCHES, rate)
    assert keep == round((1 - rate) * PATCHES) == 8 and out.shape == (batch, 1 + keep, 2)
    sets = kept_sets(out)
    for kept in sets:
        assert kept[0] == 0  # the class token
        assert len(set(kept[1:])) == keep and all(1 <= i <= PATCHES for i in kept[1:])
        assert list(kept[1:]) == sorted(kept[1:])  # kept in their order
    assert len(set(sets)) == batch  # every example its own subset
    assert kept_count(3, 0.9) == 1  # at least one


def test_the_vit_drops_after_the_position_embedding_and_before_the_encoder():
    """Training output = the encoder of `drop_tokens` applied to the embedded tokens (posemb added), class
    token kept; pool "none" returns the kept patch tokens."""
    x, key = pixels(), jax.random.key(3)
    for pool in ("tok", "none"):
        vit = ViT(tiny_vit(pool=pool, cls_token=True, patch_dropout=0.25), nnx.Rngs(0))
        expected = vit.encode(drop_tokens(vit.embed(x), nnx.Rngs(key).dropout(), 0.25, always_keep=1))
        np.testing.assert_array_equal(np.asarray(vit(x, nnx.Rngs(key))), np.asarray(expected))
    assert vit(x, nnx.Rngs(key)).shape == (4, kept_count(PATCHES, 0.25), 32)


def test_the_subset_is_reproducible_from_the_seed_and_the_step():
    tokens = indexed_tokens(4, PATCHES)
    subset = lambda seed, step: kept_sets(drop_tokens(tokens, step_key(seed, step), 0.5))  # noqa: E731
    assert subset(0, 5) == subset(0, 5)
    assert subset(0, 5) != subset(0, 6) and subset(0, 5) != subset(1, 5)


def dropout_config(rate=0.5, **mesh):
    config = tiny_config(**mesh)
    config.model.image.variant, config.model.image.patch_dropout = "mu/4", rate
    return config


@pytest.mark.slow
def test_a_two_tower_train_step_with_patch_dropout_is_finite_reproducible_and_drops():
    task, (layout, sharding, step_fn) = get_task(dropout_config()), setup(dropout_config(), jax.devices()[:1])
    history = history_of(step_fn, layout, sharding, steps=2)
    assert np.all(np.isfinite(history["loss"])) and np.all(np.isfinite(history["grad_norm"]))
    assert history == history_of(step_fn, layout, sharding, steps=2)  # the same seed and steps: the same draws
    evaluation = task.loss(layout.merge(init_train_state(layout, 0)["params"]), make_batch(0))[0]
    assert history["loss"][0] != float(evaluation)  # the step dropped patches


@pytest.mark.slow
def test_cached_embedding_microbatches_replay_their_dropout():
    """With micro-batches the recomputation (step 3) draws micro-batch j's subsets again from fold_in(rng, j):
    the loss and gradients are those of the full batch embedded with those subsets."""
    config, k = dropout_config(), 2
    config.model.loss_impl = "global"
    task = get_task(config)
    graphdef, params = nnx.split(task.build_model(nnx.Rngs(0)))
    params, batch, rng = nnx.to_pure_dict(params), make_batch(), jax.random.key(7)
    merge = lambda p: nnx.merge(graphdef, p)  # noqa: E731

    def reference(p):
        halves = [{key: value[j * 8:(j + 1) * 8] for key, value in batch.items()} for j in range(k)]
        pairs = [task.embed_pair(merge(p), half, nnx.Rngs(jax.random.fold_in(rng, j))) for j, half in enumerate(halves)]
        zimg, ztxt = (jnp.concatenate(z) for z in zip(*pairs))
        return task.loss_from_embeddings(zimg, ztxt, *task.temperature(merge(p)))[0]

    expected, expected_grads = jax.jit(jax.value_and_grad(reference))(params)
    (loss, _), grads = jax.jit(lambda p: cached_embedding_grads(task, merge, p, batch, k, 1, rng))(params)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(loss) != float(task.loss(merge(params), batch)[0])  # the dropout took effect
    for (path, got), (_, want) in zip(leaves_with_path_str(grads), leaves_with_path_str(expected_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=path)


def test_flops_count_the_kept_patches():
    """The analytic training FLOPs with patch dropout against XLA's for the training-mode forward pass."""
    config = dropout_config()
    config.model.image.pool = "gap"  # the MAP head's analytic count is ~10% high with or without dropout
    config.model.image.width = config.model.text.width = 256
    config.model.image.mlp_dim = config.model.text.mlp_dim = 1024
    task = get_task(config)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in make_batch().items()}
    forward = lambda p, b, key: task.embed_pair(nnx.merge(graphdef, p), b, nnx.Rngs(key))  # noqa: E731
    compiled = jax.jit(forward).lower(params, batch, jax.random.key(0)).compile()
    ratio = compiled.cost_analysis()["flops"] / len(make_batch()["text"]) / (task.train_flops_per_sample() / 3)
    print(f"XLA / analytic forward FLOPs with patch dropout: {ratio:.3f}")
    assert 0.9 < ratio < 1.15


def test_coca_embeds_the_same_subset_for_the_cache_and_the_recomputation():
    """CoCa's micro-batching caches `embed_pair` and recomputes with `embed_pair_and_local_loss`: with the same
    key both must drop the same patches (the first draw of the ViT); without a key neither drops."""
    import test_coca
    config = test_coca.tiny_config()
    config.model.image.variant, config.model.image.patch_dropout = "mu/4", 0.5
    task, model = build(config)
    graphdef, params = nnx.split(model)

    @jax.jit
    def image_embeddings(p, batch, key):
        model = nnx.merge(graphdef, p)
        return {"cached": task.embed_pair(model, batch, nnx.Rngs(key))[0],
                "recomputed": task.embed_pair_and_local_loss(model, batch, nnx.Rngs(key))[0][0],
                "evaluation": task.embed_pair(model, batch)[0],
                "evaluation_recomputed": task.embed_pair_and_local_loss(model, batch)[0][0]}

    z = jax.tree.map(np.asarray, image_embeddings(params, test_coca.make_batch(batch=4), jax.random.key(5)))
    np.testing.assert_allclose(z["cached"], z["recomputed"], rtol=1e-5, atol=1e-7)  # same subset: same values
    np.testing.assert_allclose(z["evaluation"], z["evaluation_recomputed"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(z["cached"], z["evaluation"])


# -- decoders ------------------------------------------------------------------------------------------------------

def build(config, seed=0):
    task = get_task(config)
    return task, task.build_model(nnx.Rngs(seed))


@pytest.mark.slow
def test_captioner_attends_to_a_per_example_subset_in_training_only():
    config = captioning_config()
    config.model.image.variant = "mu/4"
    _, plain = build(config)
    config.model.image_token_dropout = 0.5
    task, model = build(config)
    images, tokens = pixels(), jnp.asarray(make_batch()["text"][:4])
    np.testing.assert_array_equal(np.asarray(model(images, tokens)), np.asarray(plain(images, tokens)))
    full = np.asarray(model.encode_image(images))
    kept = np.asarray(model.encode_image(images, nnx.Rngs(2)))
    assert kept.shape == (4, kept_count(PATCHES, 0.5), full.shape[-1])
    sets = []
    for example in range(4):  # every kept token is one of the example's full tokens, each at most once
        matches = [np.flatnonzero((full[example] == token).all(axis=1)) for token in kept[example]]
        assert all(len(m) == 1 for m in matches)
        sets.append(tuple(int(m[0]) for m in matches))
        assert len(set(sets[-1])) == len(sets[-1])
    assert len(set(sets)) > 1
    np.testing.assert_array_equal(np.asarray(model.encode_image(images, nnx.Rngs(2))), kept)
    assert not np.array_equal(np.asarray(model.encode_image(images, nnx.Rngs(3))), kept)
    loss, _ = task.loss(model, make_batch(), nnx.Rngs(0))
    assert np.isfinite(float(loss))


@pytest.mark.slow
def test_captioning_train_step_with_both_dropouts_is_finite():
    config = captioning_config()
    config.model.image.variant, config.model.image.patch_dropout, config.model.image_token_dropout = "mu/4", 0.5, 0.5
    history = run_steps(config, jax.devices()[:1], steps=2)
    assert np.all(np.isfinite(history["loss"])) and np.all(np.isfinite(history["grad_norm"]))


def test_vlm_rows_mask_a_per_image_subset_of_image_positions():
    batch, rate = packed_rows([examples()[:2], examples()[2:4], examples()[4:]]), 0.5
    segments, slots = np.asarray(batch["segment_ids"]), np.asarray(batch["image_slot"])
    masked = np.asarray(drop_image_positions(batch["segment_ids"], batch["image_slot"], 3, IMAGE_TOKENS, rate,
                                             jax.random.key(0)))
    np.testing.assert_array_equal(masked[slots < 0], segments[slots < 0])  # text and padding untouched
    kept_patches = []
    for image in np.unique(slots[slots >= 0] // IMAGE_TOKENS):
        for row in range(len(slots)):
            at = (slots[row] >= 0) & (slots[row] // IMAGE_TOKENS == image)
            if at.any():
                kept = masked[row][at] > 0
                assert kept.sum() == kept_count(IMAGE_TOKENS, rate)
                np.testing.assert_array_equal(masked[row][at][kept], segments[row][at][kept])
                kept_patches.append(tuple(slots[row][at][kept] % IMAGE_TOKENS))
    assert len(set(kept_patches)) > 1


@pytest.mark.slow
def test_vlm_image_token_dropout_in_training_only():
    config = vlm_config()
    _, plain = build(config)
    config.model.image_token_dropout = 0.5
    task, model = build(config)
    batch = unpacked_rows(examples())
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(plain(batch)))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_of = lambda p, key: task.loss(nnx.merge(graphdef, p), batch, nnx.Rngs(key))[0]  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_of))(params, jax.random.key(0))
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(loss) != float(task.loss(model, batch)[0])


# -- configuration ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["model.image.patch_dropout=1.0"], "config key 'model.image.patch_dropout' must be in [0, 1), got 1.0"),
    (["model.image.patch_dropout=-0.1"], "config key 'model.image.patch_dropout' must be in [0, 1)"),
    (["task=captioning", "model.image_token_dropout=1.5"], "'model.image_token_dropout' must be in [0, 1)"),
    (["model.image_token_dropout=0.5"], "'model.image_token_dropout' drops image tokens before a decoder"),
])
def test_bad_rates_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/demo/clip_tiny.py", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_vlm_refuses_patch_dropout_in_one_line():
    config = vlm_config()
    config.model.image.patch_dropout = 0.5
    with pytest.raises(ConfigError, match="'model.image.patch_dropout' must be 0 for task 'vlm'") as error:
        get_task(config)
    assert "\n" not in str(error.value)
