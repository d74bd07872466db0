"""Gemma LM: a local and a global layer against a float64 numpy reference, bfloat16 compute, scan / remat
equivalence, KV-cache decoding against recomputation (left-padded bidirectional prefill, sliding windows), packed
segments, named-size parameter counts and shardings, one-line errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import vlm_jax.train_state  # noqa: F401  (turns off eager variable sharding, as the trainer does)
from vlm_jax.config import DEFAULT_SHARDING_RULES
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.gemma import GemmaConfig, GemmaLM, RMSNorm
from vlm_jax.parallel.mesh import MESH_AXES
from vlm_jax.parallel.sharding import logical_shardings


def tiny(**overrides) -> GemmaConfig:
    return GemmaConfig(size="tiny", vocab_size=97, **overrides)


def build(config: GemmaConfig, seed: int = 0) -> GemmaLM:
    """A model whose RMSNorm scales are random (zero-initialised scales would hide a wrong `1 + scale`)."""
    lm = GemmaLM(config, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(lm):
        if isinstance(node, RMSNorm):
            node.scale[...] = jnp.asarray(rng.normal(0, 0.5, node.scale.shape), jnp.float32)
    return lm


@nnx.jit
def forward(lm, x, positions, mask):
    """Hidden states of a full forward (jitted: eager op-by-op dispatch is slow on CPU)."""
    return lm(x, positions, mask)


# --- float64 numpy reference, written from the Gemma papers ---

def np_rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)


def np_rope(x_BxLxHxK, positions_BxL, base):
    half = x_BxLxHxK.shape[-1] // 2
    angle = positions_BxL[..., None, None] / base ** (np.arange(half) / half)  # [B, L, 1, K/2]
    first, second = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], -1)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_block(p, x, positions, base, visible_BxLxL, softcap, spec):
    h = np_rms(x, p["pre_attn_norm"]["scale"])
    a = p["attn"]
    q = np.einsum("bld,dhk->blhk", h, a["query"])
    k = np.einsum("bld,dhk->blhk", h, a["key"])
    v = np.einsum("bld,dhk->blhk", h, a["value"])
    q, k = np_rms(q, a["q_norm"]["scale"]), np_rms(k, a["k_norm"]["scale"])
    q, k = np_rope(q, positions, base), np_rope(k, positions, base)
    group = spec.num_heads // spec.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(spec.head_dim)
    logits = softcap * np.tanh(logits / softcap)
    logits = np.where(visible_BxLxL[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.einsum("bhqs,bshk->bqhk", probs, v)
    x = x + np_rms(np.einsum("blhk,hkd->bld", y, a["output"]), p["post_attn_norm"]["scale"])
    m = p["mlp"]
    h = np_rms(x, p["pre_mlp_norm"]["scale"])
    h = np_gelu_tanh(h @ m["gate"]) * (h @ m["up"]) @ m["down"]
    return x + np_rms(h, p["post_mlp_norm"]["scale"])


def test_two_layers_equal_numpy_reference():
    """Embedding x sqrt(D), RMSNorm (1 + scale), GQA with QK-norm, RoPE, attention softcap, post-norms, GeGLU,
    final norm, tied logits with the final softcap (small caps, so they matter); a local layer (window 3, RoPE
    base 10k) then a global one (base 1M)."""
    config = tiny(depth=2, window=3, attn_softcap=2.0, final_softcap=1.5)
    lm, spec = build(config), config.spec()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 7)), jnp.int32)
    positions = np.array([np.arange(7), np.arange(7) + 3])
    logits = lm.logits(forward(lm, lm.embed(tokens), jnp.asarray(positions), MaskSpec(causal=True)))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(lm, nnx.Param)))
    table = p["embedder"]["embedding"]
    x = table[np.asarray(tokens)] * np.sqrt(spec.width)
    q, k = np.arange(7)[:, None], np.arange(7)[None]
    layers = [(spec.rope_base_local, (k <= q) & (k > q - 3)), (spec.rope_base, k <= q)]
    for block, (base, visible) in zip(p["blocks"].values(), layers):
        x = np_block(block, x, positions, base, np.broadcast_to(visible, (2, 7, 7)), 2.0, spec)
    expected = np_rms(x, p["final_norm"]["scale"]) @ table.T
    expected = 1.5 * np.tanh(expected / 1.5)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
    f32, bf16 = build(tiny()), build(tiny(dtype=jnp.bfloat16))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    tokens, positions = jnp.arange(12).reshape(2, 6), jnp.tile(jnp.arange(6), (2, 1))
    x = bf16.embed(tokens)
    hidden = forward(bf16, x, positions, MaskSpec(causal=True))
    assert x.dtype == hidden.dtype == jnp.bfloat16 and bf16.logits(hidden).dtype == jnp.float32
    expected = forward(f32, f32.embed(tokens), positions, MaskSpec(causal=True))
    np.testing.assert_allclose(np.float32(hidden), expected, atol=0.1, rtol=0.05)


def stack_blocks(blocks):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])


@pytest.mark.slow
def test_scan_equals_loop_and_remat_changes_nothing():
    """Depth 3 with an LG pattern (not a multiple of the pattern), window 2: scanned == Python loop; remat's
    value and gradient equal the plain ones."""
    config = tiny(depth=3, window=2)
    loop, scanned = build(config), build(dataclasses.replace(config, scan=True))
    params = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    nnx.update(scanned, {**params, "blocks": stack_blocks(params["blocks"])})
    x = loop.embed(jnp.arange(16).reshape(2, 8) % 97)
    positions, mask = jnp.tile(jnp.arange(8), (2, 1)), MaskSpec(causal=True)
    np.testing.assert_allclose(forward(scanned, x, positions, mask), forward(loop, x, positions, mask),
                               rtol=1e-5, atol=1e-5)

    remat = build(dataclasses.replace(config, scan=True, remat="full"))
    nnx.update(remat, nnx.state(scanned, nnx.Param))

    def loss(model):
        return jnp.sum(model.logits(model(x, positions, mask)) ** 2)

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    (value, grads), (remat_value, remat_grads) = value_and_grad(scanned), value_and_grad(remat)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_recomputation(scan):
    """Rows with prefixes of 3 and 5 tokens, left-padded to 5 and prefilled bidirectionally in one batch, then 4
    tokens one at a time (jitted: a traced position); window 3 on the local layers. Logits at every valid slot
    equal a full forward with the prefix-LM mask over the same slots."""
    lm = build(tiny(depth=3, window=3, scan=scan))
    pad, prefix, total = np.array([2, 0]), 5, 9
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, total)), jnp.int32)
    slots = np.arange(total)[None]
    valid = slots >= pad[:, None]
    positions = jnp.asarray(np.maximum(slots - pad[:, None], 0), jnp.int32)
    segments = jnp.asarray(valid, jnp.int32)
    mask = MaskSpec(causal=True, prefix_len_B=jnp.full((2,), prefix, jnp.int32), q_segment_ids_BxT=segments,
                    kv_segment_ids_BxS=segments)
    full = lm.logits(forward(lm, lm.embed(tokens), positions, mask))

    @functools.partial(nnx.jit, static_argnames="bidirectional")
    def extend(lm, tokens_BxT, positions_BxT, cache, valid_BxT=None, bidirectional=False):
        hidden, cache = lm.extend(lm.embed(tokens_BxT), positions_BxT, cache, bidirectional=bidirectional,
                                  valid_BxT=valid_BxT)
        return lm.logits(hidden), cache

    logits, cache = extend(lm, tokens[:, :prefix], positions[:, :prefix], lm.init_cache(2, total + 1),
                           jnp.asarray(valid[:, :prefix]), bidirectional=True)
    got = [logits]
    for t in range(prefix, total):
        logits, cache = extend(lm, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        got.append(logits)
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got[valid], np.asarray(full)[valid], rtol=1e-4, atol=1e-5)
    assert int(cache["position"]) == total and cache["k"].shape[:3] == (2, 3, total + 1)


def test_packed_segments_equal_each_sequence_alone():
    """Two sequences packed in one row (segment ids, positions restarting) give each one's hidden states."""
    lm = build(tiny(depth=2, window=3))
    lengths = (5, 7)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (1, sum(lengths))), jnp.int32)
    segments = jnp.asarray([[1] * lengths[0] + [2] * lengths[1]], jnp.int32)
    positions = jnp.asarray([list(range(lengths[0])) + list(range(lengths[1]))], jnp.int32)
    packed = forward(lm, lm.embed(tokens), positions, MaskSpec(causal=True, q_segment_ids_BxT=segments,
                                                                   kv_segment_ids_BxS=segments))
    start = 0
    for length in lengths:
        alone = forward(lm, lm.embed(tokens[:, start:start + length]), jnp.arange(length)[None], MaskSpec(causal=True))
        np.testing.assert_allclose(packed[:, start:start + length], alone, rtol=1e-5, atol=1e-5)
        start += length


def expected_params(s) -> int:
    """Independent count: tied embedding; per layer q, k, v, out, GeGLU, 2 or 4 norms, QK-norms; final norm."""
    attention = s.width * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)
    norms = (4 if s.post_norms else 2) * s.width + (2 * s.head_dim if s.qk_norm else 0)
    return s.vocab_size * s.width + s.depth * (attention + 3 * s.width * s.mlp_dim + norms) + s.width


@pytest.mark.parametrize("size,count", [
    ("gemma-2b", 2_506_434_560), ("gemma2-2b", 2_614_636_800), ("gemma3-1b", 999_885_952)])
def test_named_size_parameter_counts(size, count):
    """Counted without allocating (nnx.eval_shape); the published sizes: 2.51B, 2.61B, 1.0B."""
    config = GemmaConfig(size=size, scan=True)
    lm = nnx.eval_shape(lambda: GemmaLM(config, nnx.Rngs(0)))
    params = nnx.state(lm, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == expected_params(config.spec()) == count
    # every parameter shards on fsdp x tensor (2 x 4) by the default rules; one kv head stays whole
    mesh = jax.make_mesh((1, 2, 1, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    shardings = logical_shardings(specs, DEFAULT_SHARDING_RULES, mesh)
    jax.tree.map(lambda x, sharding: sharding.shard_shape(x.shape), nnx.to_pure_dict(params), shardings)
    assert specs["embedder"]["embedding"] == P("vocab", "embed")
    attn = shardings["blocks"]["attn"]
    assert attn["query"].spec == P(None, "fsdp", "tensor", None) and attn["key"].spec == P(None, "fsdp", None, None)


def test_bad_inputs_fail_with_one_line_errors():
    with pytest.raises(ValueError, match="unknown Gemma size 'gemma-9x'; known sizes: tiny, gemma-2b"):
        GemmaConfig(size="gemma-9x").spec()
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads 3"):
        tiny(num_kv_heads=3).spec()
    lm = build(tiny(depth=1))
    x = lm.embed(jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"positions \(2, 3\) do not match the tokens \(2, 4\)"):
        lm(x, jnp.zeros((2, 3), jnp.int32), MaskSpec(causal=True))
    with pytest.raises(ValueError, match="decode length 4 is beyond the cache length 3"):
        lm.extend(x, jnp.zeros((2, 4), jnp.int32), lm.init_cache(2, 3))
