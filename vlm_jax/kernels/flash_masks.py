"""A `MaskSpec` turned into the per-position arrays and per-block loop ranges the flash kernels read.

Every mask kind reduces to two per-position tests: key position < the query's key limit (full: S; causal:
i + 1; prefix-LM: max(prefix, i + 1)) and equal segment ids. The loop ranges say, for each query block, which
key blocks can hold a visible key (and the reverse for the key/value gradient kernel), so blocks that the mask
empties are never loaded or multiplied.

Shape key: B batch, T / S padded query / key lengths, Q / N query / key blocks, C keys per block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.kernels.masks import MaskSpec, unmatchable_padding
from vlm_jax.kernels.padding import pad_to

_BIG = 2**30


class BlockMask(NamedTuple):
    """What the kernels read: `key_limit_BxTx1`, optional segment ids, and [lo, hi) block ranges, flat.
    Key segment ids are one row per key block, so a kernel picks its row by a sublane index (TPU-friendly)."""
    key_limit_BxTx1: jax.Array
    q_segments_BxTx1: jax.Array | None
    kv_segments_BxNxC: jax.Array | None  # key segment ids as [key block, position in block]
    kv_range_lo: jax.Array   # [B * Q]: first key block each query block visits
    kv_range_hi: jax.Array   # [B * Q]: one past the last
    q_range_lo: jax.Array    # [B * N]: first query block each key block visits (backward)
    q_range_hi: jax.Array


def check_prefix(mask: MaskSpec, length: int) -> None:
    """One-line error for a prefix longer than the sequence (checked when the lengths are concrete)."""
    prefix = mask.prefix_len_B
    if prefix is None or isinstance(prefix, jax.core.Tracer) or prefix.size == 0:
        return
    prefix = np.asarray(prefix)  # a concrete array; numpy, so the check is not staged into an enclosing trace
    shortest, longest = int(prefix.min()), int(prefix.max())
    if longest > length or shortest < 0:
        raise ValueError(f"prefix length {longest if longest > length else shortest} is outside the sequence "
                         f"of {length} tokens")


def _ranges(table_BxQxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True along the last axis; (0, 0) for a row with none."""
    blocks = table_BxQxN.shape[-1]
    any_visible = table_BxQxN.any(-1)
    lo = jnp.argmax(table_BxQxN, axis=-1)
    hi = blocks - jnp.argmax(table_BxQxN[..., ::-1], axis=-1)
    return (jnp.where(any_visible, lo, 0).reshape(-1).astype(jnp.int32),
            jnp.where(any_visible, hi, 0).reshape(-1).astype(jnp.int32))


def _segment_span(ids_BxL: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest positive segment id per block (an empty span for blocks of padding only)."""
    blocks = ids_BxL.reshape(ids_BxL.shape[0], -1, block)
    valid = blocks > 0
    return (jnp.where(valid, blocks, _BIG).min(-1), jnp.where(valid, blocks, -_BIG).max(-1))


def build_block_mask(mask: MaskSpec, batch: int, length_q: int, length_k: int, padded_q: int, padded_k: int,
                     block_q: int, block_k: int) -> BlockMask:
    """Per-position limits and segment ids padded to the kernel lengths, and the visited block ranges."""
    positions = jnp.arange(padded_q)
    if mask.prefix_len_B is not None:
        limit_BxT = jnp.maximum(mask.prefix_len_B.astype(jnp.int32)[:, None], positions[None] + 1)
    elif mask.causal:
        limit_BxT = jnp.broadcast_to(positions + 1, (batch, padded_q))
    else:
        limit_BxT = jnp.full((batch, padded_q), length_k)
    limit_BxT = jnp.where(positions[None] < length_q, jnp.minimum(limit_BxT, length_k), 0).astype(jnp.int32)
    blocks_q, blocks_k = padded_q // block_q, padded_k // block_k
    key_starts_N = jnp.arange(blocks_k) * block_k
    table = key_starts_N[None, None] < limit_BxT.reshape(batch, blocks_q, block_q).max(-1)[..., None]
    q_segments = kv_segments = None
    if mask.q_segment_ids_BxT is not None:
        q_ids = pad_to(mask.q_segment_ids_BxT.astype(jnp.int32), {1: padded_q})
        kv_ids = pad_to(mask.kv_segment_ids_BxS.astype(jnp.int32), {1: padded_k})
        q_lo, q_hi = _segment_span(q_ids, block_q)
        k_lo, k_hi = _segment_span(kv_ids, block_k)
        table = table & (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
        q_segments = q_ids[..., None]
        kv_segments = unmatchable_padding(kv_ids).reshape(batch, blocks_k, block_k)
    kv_lo, kv_hi = _ranges(table)
    q_lo, q_hi = _ranges(jnp.swapaxes(table, 1, 2))
    return BlockMask(limit_BxT[..., None], q_segments, kv_segments, kv_lo, kv_hi, q_lo, q_hi)
