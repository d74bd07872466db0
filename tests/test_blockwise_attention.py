"""The blockwise (scan over key blocks) XLA attention against a plain reference: every mask kind, lengths
that are not block multiples, grouped-query heads, values and gradients; and its linear memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.masks import MaskSpec

from attention_cases import KINDS, LENGTHS, masks, reference


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_matches_reference_values_and_gradients(length, kind):
    batch, heads, kv_heads, dim = 2, 4, 2, 16
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim))
    cotangent = jax.random.normal(keys[3], (batch, length, heads, dim))
    mask = masks(batch, length)[kind]
    visible = jnp.broadcast_to(mask.dense(length, length), (batch, length, length))
    ours = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, mask, block_size=128) * cotangent)
    plain = lambda q, k, v: jnp.sum(reference(q, k, v, visible) * cotangent)
    np.testing.assert_allclose(blockwise_attention(q, k, v, mask, block_size=128), reference(q, k, v, visible),
                               atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


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

    from test_train_step import run_steps, tiny_config
    config = tiny_config()
    config.model.attention_impl = "blockwise"
    plain = tiny_config()
    plain.model.attention_impl = "xla"
    np.testing.assert_allclose(run_steps(config, jax.devices()[:1]), run_steps(plain, jax.devices()[:1]), rtol=1e-5)


def test_bench_attention_row():
    from vlm_jax.bench_attention import measure
    row = measure("blockwise", 64, causal=True, repeats=1)
    assert row["impl"] == "blockwise" and row["fwd_bwd_ms"] > 0 and row["forward_temp_mib"] > 0
