"""A `MaskSpec` turned into the per-position arrays and per-block loop ranges the flash kernels read.

Every mask kind reduces to per-position tests: the query's key start <= key position < its key limit, and
equal segment ids. The limit is S for a full mask, i + 1 causal, max(prefix end, i + 1) prefix-LM (per example
or per query); the start is i - window + 1 with a sliding window (else no start). The loop ranges say, for
each query block, which key blocks can hold a visible key (and the reverse for the key/value gradient kernel),
so blocks that the mask empties are never loaded or multiplied.

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
    """What the kernels read: `key_limit_BxTx1`, an optional `key_start_BxTx1` (sliding window), optional
    segment ids, and [lo, hi) block ranges, flat. Key segment ids are one row per key block, so a kernel picks
    its row by a sublane index (TPU-friendly)."""
    key_limit_BxTx1: jax.Array
    key_start_BxTx1: jax.Array | None
    q_segments_BxTx1: jax.Array | None
    kv_segments_BxNxC: jax.Array | None  # key segment ids as [key block, position in block]
    kv_range_lo: jax.Array   # [B * Q]: first key block each query block visits
    kv_range_hi: jax.Array   # [B * Q]: one past the last
    q_range_lo: jax.Array    # [B * N]: first query block each key block visits (backward)
    q_range_hi: jax.Array


def check_prefix(mask: MaskSpec, length: int) -> None:
    """One-line error for a prefix length or prefix end outside the sequence (checked when concrete)."""
    for name, prefix in (("prefix length", mask.prefix_len_B), ("prefix end", mask.q_prefix_end_BxT)):
        if prefix is None or isinstance(prefix, jax.core.Tracer) or prefix.size == 0:
            continue
        prefix = np.asarray(prefix)  # a concrete array; numpy, so the check is not staged into an enclosing trace
        shortest, longest = int(prefix.min()), int(prefix.max())
        if longest > length or shortest < 0:
            raise ValueError(f"{name} {longest if longest > length else shortest} is outside the sequence "
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


def _key_limits(mask: MaskSpec, batch: int, length_q: int, length_k: int, padded_q: int) -> jax.Array:
    """int32 [B, T]: one past the last key position each query may see; 0 for padded queries."""
    positions = jnp.arange(padded_q)
    if mask.is_causal:
        limit_BxT = jnp.broadcast_to(positions + 1, (batch, padded_q))
    else:
        limit_BxT = jnp.full((batch, padded_q), length_k)
    if mask.prefix_len_B is not None:
        limit_BxT = jnp.maximum(limit_BxT, mask.prefix_len_B.astype(jnp.int32)[:, None])
    if mask.q_prefix_end_BxT is not None:
        limit_BxT = jnp.maximum(limit_BxT, pad_to(mask.q_prefix_end_BxT.astype(jnp.int32), {1: padded_q}))
    return jnp.where(positions[None] < length_q, jnp.minimum(limit_BxT, length_k), 0).astype(jnp.int32)


def _key_starts(mask: MaskSpec, batch: int, padded_q: int) -> jax.Array:
    """int32 [B, T]: the first key position each query may see (0 without a window)."""
    positions = jnp.arange(padded_q, dtype=jnp.int32)
    starts_T = jnp.zeros_like(positions) if mask.window is None else positions + 1 - mask.window
    return jnp.broadcast_to(starts_T, (batch, padded_q)).astype(jnp.int32)


def _block_table(limit_BxT, start_BxT, block_q: int, block_k: int, blocks_k: int) -> jax.Array:
    """bool [B, Q, N]: some query of block i has a key of block j inside its [start, limit) interval
    (queries with an empty interval count for nothing)."""
    batch = limit_BxT.shape[0]
    non_empty = start_BxT < limit_BxT
    max_limit_BxQ = jnp.where(non_empty, limit_BxT, 0).reshape(batch, -1, block_q).max(-1)
    min_start_BxQ = jnp.where(non_empty, start_BxT, _BIG).reshape(batch, -1, block_q).min(-1)
    key_starts_N = jnp.arange(blocks_k) * block_k
    return ((key_starts_N[None, None] < max_limit_BxQ[..., None])
            & (min_start_BxQ[..., None] < key_starts_N[None, None] + block_k))


def build_block_mask(mask: MaskSpec, batch: int, length_q: int, length_k: int, padded_q: int, padded_k: int,
                     block_q: int, block_k: int) -> BlockMask:
    """Per-position limits, starts and segment ids padded to the kernel lengths, and the visited block ranges."""
    limit_BxT = _key_limits(mask, batch, length_q, length_k, padded_q)
    start_BxT = _key_starts(mask, batch, padded_q)
    blocks_k = padded_k // block_k
    table = _block_table(limit_BxT, start_BxT, block_q, block_k, blocks_k)
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
    key_start = None if mask.window is None else start_BxT[..., None]
    return BlockMask(limit_BxT[..., None], key_start, q_segments, kv_segments, kv_lo, kv_hi, q_lo, q_hi)
