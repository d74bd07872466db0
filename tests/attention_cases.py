"""Shared by the attention tests: the plain reference, the mask kinds, random inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.kernels.masks import MaskSpec

LENGTHS = [1, 127, 197, 729, 1025]
KINDS = ["full", "causal", "prefix", "segments"]
# The Gemma / PaliGemma features: name -> (mask kind, soft-cap)
FEATURES = {"packed_prefix": ("packed_prefix", None), "window_causal": ("window_causal", None),
            "window_prefix": ("window_prefix", None), "softcap_causal": ("causal", 2.0),
            "combined": ("packed_window", 2.0)}


def reference(q, k, v, visible, softcap=None):
    """Plain float32 attention: kv heads repeated, logits soft-capped if asked, dense mask, rows with no
    visible key give zeros."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * q.shape[-1] ** -0.5
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
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


def packed_prefix_lm(batch, length, examples=3):
    """Segment ids and per-query prefix ends [B, T] of rows packing `examples` prefix-LM examples (each with
    its own prefix: empty, partial or whole) followed by padding (segment 0, prefix end 0)."""
    rng = np.random.default_rng(length + 1)
    ids, ends = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), examples, replace=False))
        for segment, (start, stop) in enumerate(zip([0, *cuts[:-1]], cuts), 1):
            ids[row, start:stop] = segment
            ends[row, start:stop] = rng.integers(start, stop + 1)
    return jnp.asarray(ids), jnp.asarray(ends)


def feature_masks(batch, length, window=None):
    """Packed prefix-LM with segment ids, a sliding window (a traced-able int32 array; default a third of the
    sequence) with causal and with per-example prefix-LM masks, and all of them at once."""
    window = jnp.asarray(length // 3 if window is None else window, jnp.int32)
    ids, ends = packed_prefix_lm(batch, length)
    packed = MaskSpec(q_prefix_end_BxT=ends, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids)
    return {"packed_prefix": packed, "causal": MaskSpec(causal=True),
            "window_causal": MaskSpec(causal=True, window=window),
            "window_prefix": MaskSpec(prefix_len_B=masks(batch, length)["prefix"].prefix_len_B, window=window),
            "packed_window": MaskSpec(q_prefix_end_BxT=ends, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids,
                                      window=window)}


def random_inputs(seed, batch, length_q, length_k, heads, kv_heads, dim, dtype=jnp.float32):
    """q [B, T, H, D], k and v [B, S, K, D] in `dtype`, and a float32 output cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length_q, heads, dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length_k, kv_heads, dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length_k, kv_heads, dim)).astype(dtype)
    return q, k, v, jax.random.normal(keys[3], (batch, length_q, heads, dim))


def values_and_grads(attention, q, k, v, cotangent, *extra):
    """attention(q, k, v, *extra) and the gradients of <attention(q, k, v, *extra), cotangent> in q, k, v, in
    float32, from one compiled program. Everything goes in as an argument: a closed-over mask would be
    constant-folded, slowly."""
    def program(q, k, v, cotangent, *extra):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *extra).astype(jnp.float32), q, k, v)
        return [out, *(g.astype(jnp.float32) for g in vjp(cotangent))]
    return jax.jit(program)(q, k, v, cotangent, *extra)
