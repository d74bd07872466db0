"""What every flash-attention kernel shares: the static tiling of a call and the math of one tile.

A tile is [block_q queries] x [block_k keys] of one head. The kernels differ in how tiles reach them (a loop
over resident rows on GPU / in interpret mode, a streamed grid axis on TPU) but compute each tile the same way:
the mask test, the online-softmax update of the forward pass, and the recomputed probabilities and logit
gradient of the backward pass (FlashAttention-2).

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
    vmem_limit_bytes: int | None = None  # TPU: Mosaic's VMEM limit per kernel (None: the compiler's default)

    @property
    def blocks_q(self) -> int:
        return self.padded_q // self.block_q

    @property
    def blocks_k(self) -> int:
        return self.padded_k // self.block_k


def split_mask_refs(refs, segments: bool):
    """(query segment ref, key segment ref, the remaining refs) of a kernel's trailing refs; the segment refs
    are None when the call has no segment ids."""
    if segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def dot(a: jax.Array, b: jax.Array, dimensions) -> jax.Array:
    """A matmul inside a kernel, accumulated in float32. float32 operands get exact (HIGHEST) products;
    bfloat16 operands go to the MXU as they are (their products are exact in float32 anyway; Mosaic rejects a
    float32 contract precision on bfloat16 operands)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dimensions, precision=precision, preferred_element_type=jnp.float32)


def visible(limit_Qx1: jax.Array, key_block, q_segments_Qx1: jax.Array | None,
            kv_segments_1xC: jax.Array | None, block_k: int) -> jax.Array:
    """bool [Q, C]: key position < the query's limit, and the same segment when packed."""
    key_positions = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    result = key_positions < limit_Qx1
    if kv_segments_1xC is not None:
        result = result & (q_segments_Qx1 == kv_segments_1xC)
    return result


def online_softmax_step(q_QxD, k_CxD, v_CxD, visible_QxC, row_max_Qx1, row_sum_Qx1, acc_QxD, scale: float):
    """One key block folded into the running max, sum and (unnormalised) output of the forward pass."""
    logits = jnp.where(visible_QxC, dot(q_QxD, k_CxD, NT) * scale, NEG)
    new_max = jnp.maximum(row_max_Qx1, logits.max(axis=1, keepdims=True))
    probs = jnp.where(visible_QxC, jnp.exp(logits - new_max), 0.0)
    correction = jnp.exp(row_max_Qx1 - new_max)
    acc = acc_QxD * correction + dot(probs.astype(v_CxD.dtype), v_CxD, NN)
    return new_max, row_sum_Qx1 * correction + probs.sum(axis=1, keepdims=True), acc


def finish_forward(row_max_Qx1, row_sum_Qx1, acc_QxD, out_dtype):
    """Normalised output and log-sum-exp (+inf for rows that saw no key: their output is zero)."""
    has_keys = row_sum_Qx1 > 0
    safe_sum = jnp.where(has_keys, row_sum_Qx1, 1.0)
    out = (acc_QxD / safe_sum).astype(out_dtype)
    return out, jnp.where(has_keys, row_max_Qx1 + jnp.log(safe_sum), jnp.inf)


def probs_and_dlogits(q_QxD, k_CxD, v_CxD, d_out_QxD, lse_Qx1, delta_Qx1, visible_QxC, scale: float):
    """Recomputed probabilities and the logit gradient of one tile."""
    probs = jnp.where(visible_QxC, jnp.exp(dot(q_QxD, k_CxD, NT) * scale - lse_Qx1), 0.0)
    d_probs = dot(d_out_QxD, v_CxD, NT)
    return probs, probs * (d_probs - delta_Qx1)
