"""What every flash-attention kernel shares: the static tiling of a call and the math of one tile.

A tile is [block_q queries] x [block_k keys] of one head. The kernels differ in how tiles reach them (a loop
over resident rows on GPU / in interpret mode, a streamed grid axis on TPU) but compute each tile the same way:
the mask test, the (optionally soft-capped) logits, the online-softmax update of the forward pass, and the
recomputed probabilities and logit gradient of the backward pass (FlashAttention-2).

Shape key: Q queries in a block, C keys in a block, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": rows with no visible key stay NaN-free
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static facts about one call: block sizes, padded lengths, heads per key/value head, where it runs."""
    block_q: int
    block_k: int
    padded_q: int
    padded_k: int
    groups: int
    scale: float
    platform: str
    segments: bool
    windowed: bool = False               # a per-query key start (sliding window) comes with the key limit
    softcap: float | None = None         # logits = softcap * tanh(logits / softcap) (Gemma 2)
    vmem_limit_bytes: int | None = None  # TPU: Mosaic's VMEM limit per kernel (None: the compiler's default)

    @property
    def blocks_q(self) -> int:
        return self.padded_q // self.block_q

    @property
    def blocks_k(self) -> int:
        return self.padded_k // self.block_k


def split_mask_refs(refs, t: Tiling):
    """(key start ref, query segment ref, key segment ref, the remaining refs) of the refs after a kernel's key
    limit ref; the start ref is None without a window, the segment refs None without segment ids."""
    refs = list(refs)
    start_ref = refs.pop(0) if t.windowed else None
    q_segment_ref, kv_segment_ref = (refs.pop(0), refs.pop(0)) if t.segments else (None, None)
    return start_ref, q_segment_ref, kv_segment_ref, refs


def dot(a: jax.Array, b: jax.Array, dimensions) -> jax.Array:
    """A matmul inside a kernel, accumulated in float32. float32 operands get exact (HIGHEST) products;
    bfloat16 operands go to the MXU as they are (their products are exact in float32 anyway; Mosaic rejects a
    float32 contract precision on bfloat16 operands)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dimensions, precision=precision, preferred_element_type=jnp.float32)


def visible(limit_Qx1: jax.Array, start_Qx1: jax.Array | None, key_block, q_segments_Qx1: jax.Array | None,
            kv_segments_1xC: jax.Array | None, block_k: int) -> jax.Array:
    """bool [Q, C]: the query's key start <= key position < its limit, and the same segment when packed."""
    key_positions = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    result = key_positions < limit_Qx1
    if start_Qx1 is not None:
        result = result & (key_positions >= start_Qx1)
    if kv_segments_1xC is not None:
        result = result & (q_segments_Qx1 == kv_segments_1xC)
    return result


def logits(q_QxD, k_CxD, t: Tiling) -> tuple[jax.Array, jax.Array | None]:
    """float32 [Q, C] scaled logits of a tile, soft-capped when the call has a cap, and their tanh (None
    without a cap: the backward pass needs it for the cap's derivative, 1 - tanh^2)."""
    raw = dot(q_QxD, k_CxD, NT) * t.scale
    if t.softcap is None:
        return raw, None
    tanh = jnp.tanh(raw / t.softcap)
    return t.softcap * tanh, tanh


def online_softmax_step(q_QxD, k_CxD, v_CxD, visible_QxC, row_max_Qx1, row_sum_Qx1, acc_QxD, t: Tiling):
    """One key block folded into the running max, sum and (unnormalised) output of the forward pass."""
    logits_QxC = jnp.where(visible_QxC, logits(q_QxD, k_CxD, t)[0], NEG)
    new_max = jnp.maximum(row_max_Qx1, logits_QxC.max(axis=1, keepdims=True))
    probs = jnp.where(visible_QxC, jnp.exp(logits_QxC - new_max), 0.0)
    correction = jnp.exp(row_max_Qx1 - new_max)
    acc = acc_QxD * correction + dot(probs.astype(v_CxD.dtype), v_CxD, NN)
    return new_max, row_sum_Qx1 * correction + probs.sum(axis=1, keepdims=True), acc


def finish_forward(row_max_Qx1, row_sum_Qx1, acc_QxD, out_dtype):
    """Normalised output and log-sum-exp (+inf for rows that saw no key: their output is zero)."""
    has_keys = row_sum_Qx1 > 0
    safe_sum = jnp.where(has_keys, row_sum_Qx1, 1.0)
    out = (acc_QxD / safe_sum).astype(out_dtype)
    return out, jnp.where(has_keys, row_max_Qx1 + jnp.log(safe_sum), jnp.inf)


def probs_and_dlogits(q_QxD, k_CxD, v_CxD, d_out_QxD, lse_Qx1, delta_Qx1, visible_QxC, t: Tiling):
    """Recomputed probabilities and the gradient of the scaled logits before any soft-cap, of one tile."""
    logits_QxC, tanh_QxC = logits(q_QxD, k_CxD, t)
    probs = jnp.where(visible_QxC, jnp.exp(logits_QxC - lse_Qx1), 0.0)
    d_logits = probs * (dot(d_out_QxD, v_CxD, NT) - delta_Qx1)
    if tanh_QxC is not None:
        d_logits = d_logits * (1.0 - tanh_QxC * tanh_QxC)
    return probs, d_logits
