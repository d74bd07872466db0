"""The blockwise (scan over key blocks) XLA attention against a plain reference: every mask kind, lengths
that are not block multiples, grouped-query heads, values and gradients; and its linear memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.masks import MaskSpec

from attention_cases import KINDS, LENGTHS, masks, random_inputs, reference, values_and_grads


@pytest.mark.slow
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_matches_reference_values_and_gradients(length, kind):
    q, k, v, cotangent = random_inputs(length, 2, length, length, heads=4, kv_heads=2, dim=16)
    mask = masks(2, length)[kind]
    visible = jnp.broadcast_to(mask.dense(length, length), (2, length, length))
    ours = functools.partial(blockwise_attention, block_size=128)
    got = values_and_grads(ours, q, k, v, cotangent, mask)
    want = values_and_grads(reference, q, k, v, cotangent, visible)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_memory_grows_linearly():
    """Forward temporaries at sequence 16,384: blockwise <= 1/8 of the plain T x S version."""
    shape = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)
    blockwise = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, MaskSpec(causal=True)))
    plain = jax.jit(lambda q, k, v: reference(q, k, v, MaskSpec(causal=True).dense(16384, 16384)))
    ours = blockwise.lower(shape, kv, kv).compile().memory_analysis().temp_size_in_bytes
    theirs = plain.lower(shape, kv, kv).compile().memory_analysis().temp_size_in_bytes
    print(f"blockwise {ours / 2**20:.0f} MiB, plain {theirs / 2**20:.0f} MiB")
    assert ours * 8 <= theirs


@pytest.mark.slow
def test_dispatcher_errors_and_training_with_blockwise_attention():
    from vlm_jax.kernels.attention import dot_product_attention
    q, k = jnp.ones((1, 5, 4, 8)), jnp.ones((1, 7, 3, 8))
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 key/value heads"):
        dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attention shapes disagree"):
        dot_product_attention(q, jnp.ones((1, 7, 2, 4)), jnp.ones((1, 7, 2, 4)))
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        dot_product_attention(q, q, q, impl="flash")
    segments = MaskSpec(q_segment_ids_BxT=jnp.ones((1, 4), jnp.int32), kv_segment_ids_BxS=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="segment ids"):
        dot_product_attention(q, q, q, mask=segments)

    from test_train_step import assert_same_history, run_steps, tiny_config
    config = tiny_config()
    config.model.attention_impl = "blockwise"
    plain = tiny_config()
    plain.model.attention_impl = "xla"
    assert_same_history(run_steps(config, jax.devices()[:1]), run_steps(plain, jax.devices()[:1]))


def test_bench_attention_rows():
    """On CPU the bench covers the two native paths (the Pallas kernel only runs interpreted here)."""
    from vlm_jax.bench_attention import bench_attention
    result = bench_attention([64], "prefix")
    assert result["backend"] == "cpu" and result["dtype"] == "float32"
    assert [row["impl"] for row in result["rows"]] == ["xla", "blockwise"] and result["rows"][0]["mask"] == "prefix"
    assert all(row["fwd_bwd_ms"] > 0 and row["forward_temp_mib"] > 0 for row in result["rows"])
