"""Shared by the attention tests: the plain reference, the mask kinds, random inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.kernels.masks import MaskSpec

LENGTHS = [1, 127, 197, 729, 1025]
KINDS = ["full", "causal", "prefix", "segments"]


def reference(q, k, v, visible):
    """Plain float32 attention: kv heads repeated, dense mask, rows with no visible key give zeros."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * q.shape[-1] ** -0.5
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    probs = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1)) * visible[:, None].any(-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


def masks(batch, length):
    """One MaskSpec per kind; the prefix is a third of the sequence for the first example, all of it for the
    second; segment ids are sorted (packed sequences) and include 0 (padding)."""
    rng = np.random.default_rng(length)
    segments = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1))
    return {"full": MaskSpec(), "causal": MaskSpec(causal=True),
            "prefix": MaskSpec(prefix_len_B=jnp.asarray([length // 3, length], jnp.int32)[:batch]),
            "segments": MaskSpec(q_segment_ids_BxT=segments, kv_segment_ids_BxS=segments)}


def random_inputs(seed, batch, length_q, length_k, heads, kv_heads, dim, dtype=jnp.float32):
    """q [B, T, H, D], k and v [B, S, K, D] in `dtype`, and a float32 output cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length_q, heads, dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length_k, kv_heads, dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length_k, kv_heads, dim)).astype(dtype)
    return q, k, v, jax.random.normal(keys[3], (batch, length_q, heads, dim))


def values_and_grads(attention, q, k, v, cotangent, *extra):
    """attention(q, k, v, *extra) and the gradients of <attention(q, k, v, *extra), cotangent> in q, k, v, in
    float32. Everything goes in as an argument: a closed-over mask would be constant-folded, slowly."""
    def loss(q, k, v, cotangent, *extra):
        return jnp.sum(attention(q, k, v, *extra).astype(jnp.float32) * cotangent)
    out = jax.jit(attention)(q, k, v, *extra).astype(jnp.float32)
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v, cotangent, *extra)
    return [out, *(g.astype(jnp.float32) for g in grads)]
