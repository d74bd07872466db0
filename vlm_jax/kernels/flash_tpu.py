"""Flash-attention kernels for TPU (Mosaic): keys and values stream through VMEM one block per grid step.

The innermost grid axis walks key blocks (forward, dq) or, for dk/dv, the query blocks of every query head that
shares the key/value head; it is sequential ("arbitrary"), and the online-softmax state or the gradient
accumulators live in VMEM scratch across it. VMEM per program is a few tiles whatever the sequence length.
Blocks the mask empties are skipped twice over: the index maps clamp the block index into the visited
[lo, hi) range (from `flash_masks.BlockMask`, scalar-prefetched into SMEM), so the pipeline issues no new copy
for them, and the body runs under `pl.when` only inside the range.

Layout: [B, H, T, D]. Shape key: B batch, H query heads, K key/value heads (H = K x G), T / S padded lengths,
D head dim, Q / C rows of a query / key block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.flash_masks import BlockMask
from vlm_jax.kernels.flash_tiles import (NEG, NN, TN, Tiling, dot, finish_forward, online_softmax_step,
                                         probs_and_dlogits, split_mask_refs, visible)

LANES = 128  # TPU blocks are multiples of this along the lane dimension
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _clamp(index, lo, hi):
    """`index` moved into [lo, hi): a skipped step keeps the previous block, so nothing is copied for it."""
    return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, lo))


def _read(ref):
    return None if ref is None else ref[...]


# ----------------------------------------------------------------------------------------------- kernels

def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, (out_ref, lse_ref, max_ref, sum_ref, acc_ref) = split_mask_refs(
        refs, t)
    row, j = pl.program_id(0) * t.blocks_q + pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        max_ref[...] = jnp.full(max_ref.shape, NEG, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= lo_ref[row]) & (j < hi_ref[row]))
    def _():
        mask = visible(limit_ref[...], _read(start_ref), j, _read(q_segment_ref), _read(kv_segment_ref), t.block_k)
        max_ref[...], sum_ref[...], acc_ref[...] = online_softmax_step(
            q_ref[...], k_ref[...], v_ref[...], mask, max_ref[...], sum_ref[...], acc_ref[...], t)

    @pl.when(j == t.blocks_k - 1)
    def _():
        out_ref[...], lse_ref[...] = finish_forward(max_ref[...], sum_ref[...], acc_ref[...], out_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, rest = split_mask_refs(refs, t)
    d_out_ref, lse_ref, delta_ref, dq_ref, dq_acc_ref = rest
    row, j = pl.program_id(0) * t.blocks_q + pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    @pl.when((j >= lo_ref[row]) & (j < hi_ref[row]))
    def _():
        k = k_ref[...]
        mask = visible(limit_ref[...], _read(start_ref), j, _read(q_segment_ref), _read(kv_segment_ref), t.block_k)
        _, d_logits = probs_and_dlogits(q_ref[...], k, v_ref[...], d_out_ref[...], lse_ref[...],
                                        delta_ref[...], mask, t)
        dq_acc_ref[...] += dot(d_logits.astype(k.dtype), k, NN)

    @pl.when(j == t.blocks_k - 1)
    def _():
        dq_ref[...] = (dq_acc_ref[...] * t.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, rest = split_mask_refs(refs, t)
    d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = rest
    key_block, step = pl.program_id(2), pl.program_id(3)
    row, i = pl.program_id(0) * t.blocks_k + key_block, jax.lax.rem(step, t.blocks_q)

    @pl.when(step == 0)
    def _():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when((i >= lo_ref[row]) & (i < hi_ref[row]))
    def _():
        q, d_out = q_ref[...], d_out_ref[...]
        mask = visible(limit_ref[...], _read(start_ref), key_block, _read(q_segment_ref), _read(kv_segment_ref),
                       t.block_k)
        probs, d_logits = probs_and_dlogits(q, k_ref[...], v_ref[...], d_out, lse_ref[...], delta_ref[...],
                                            mask, t)
        dv_acc_ref[...] += dot(probs.astype(d_out.dtype), d_out, TN)
        dk_acc_ref[...] += dot(d_logits.astype(q.dtype), q, TN)

    @pl.when(step == t.groups * t.blocks_q - 1)
    def _():
        dk_ref[...] = (dk_acc_ref[...] * t.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ pallas calls

def _call(kernel, t: Tiling, grid, tables, inputs, in_specs, out_shapes, out_specs, scratch, cost):
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(functools.partial(kernel, t=t), out_shape=out_shapes, grid_spec=grid_spec,
                          name=f"flash{kernel.__name__.removesuffix('_kernel')}",
                          compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS,
                                                               vmem_limit_bytes=t.vmem_limit_bytes),
                          cost_estimate=cost)(*tables, *inputs)


def _cost(t: Tiling, batch: int, heads: int, dim: int, matmuls: int, inputs) -> pl.CostEstimate:
    """XLA's view of a kernel (it cannot look inside): `matmuls` tile matmuls over every (query, key) pair
    of every head, one exponential (and a tanh with a soft-cap) per pair, and each input read once."""
    pairs = batch * heads * t.padded_q * t.padded_k
    return pl.CostEstimate(flops=2 * matmuls * pairs * dim, transcendentals=pairs * (1 if t.softcap is None else 2),
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in inputs))


def _query_major_specs(t: Tiling, dim: int):
    """Specs of the grids (b, h, query block i, key block j) of the forward and dq kernels: tiles of the
    query side at i, and of the key side at j clamped into query block i's range."""
    def clamped(b, i, j, lo, hi):
        row = b * t.blocks_q + i
        return _clamp(j, lo[row], hi[row])

    q_tile = pl.BlockSpec((None, None, t.block_q, dim), lambda b, h, i, j, *_: (b, h, i, 0))
    stat_tile = pl.BlockSpec((None, None, t.block_q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_tile = pl.BlockSpec((None, None, t.block_k, dim),
                           lambda b, h, i, j, lo, hi: (b, jax.lax.div(h, t.groups), clamped(b, i, j, lo, hi), 0))
    q_side = pl.BlockSpec((None, t.block_q, 1), lambda b, h, i, j, *_: (b, i, 0))
    kv_side = pl.BlockSpec((None, 1, t.block_k), lambda b, h, i, j, lo, hi: (b, 0, clamped(b, i, j, lo, hi)))
    return q_tile, stat_tile, kv_tile, q_side, kv_side


def _key_major_specs(t: Tiling, dim: int):
    """Specs of the dk/dv grid (b, key/value head, key block j, step): step runs over the G query heads of
    the group times the query blocks, each clamped into key block j's range."""
    def query_block(b, j, step, lo, hi):
        row = b * t.blocks_k + j
        return _clamp(jax.lax.rem(step, t.blocks_q), lo[row], hi[row])

    def query_head(kv_head, step):
        return kv_head * t.groups + jax.lax.div(step, t.blocks_q)

    q_tile = pl.BlockSpec((None, None, t.block_q, dim), lambda b, g, j, s, lo, hi: (
        b, query_head(g, s), query_block(b, j, s, lo, hi), 0))
    stat_tile = pl.BlockSpec((None, None, t.block_q, 1), lambda b, g, j, s, lo, hi: (
        b, query_head(g, s), query_block(b, j, s, lo, hi), 0))
    kv_tile = pl.BlockSpec((None, None, t.block_k, dim), lambda b, g, j, s, *_: (b, g, j, 0))
    q_side = pl.BlockSpec((None, t.block_q, 1), lambda b, g, j, s, lo, hi: (b, query_block(b, j, s, lo, hi), 0))
    kv_side = pl.BlockSpec((None, 1, t.block_k), lambda b, g, j, s, *_: (b, 0, j))
    return q_tile, stat_tile, kv_tile, q_side, kv_side


def _mask_inputs(masks: BlockMask, t: Tiling, q_side, kv_side):
    """Per-query limits, starts with a window, and, when packed, segment ids (keys' as one [1, S] row per
    example), in the order `split_mask_refs` reads them."""
    arrays, specs = [masks.key_limit_BxTx1], [q_side]
    if t.windowed:
        arrays, specs = arrays + [masks.key_start_BxTx1], specs + [q_side]
    if t.segments:
        kv_segments_Bx1xS = masks.kv_segments_BxNxC.reshape(masks.kv_segments_BxNxC.shape[0], 1, -1)
        arrays += [masks.q_segments_BxTx1, kv_segments_Bx1xS]
        specs += [q_side, kv_side]
    return arrays, specs


def forward(q, k, v, masks: BlockMask, t: Tiling):
    """(out [B, H, T, D], lse [B, H, T, 1] float32)."""
    batch, heads, _, dim = q.shape
    q_tile, stat_tile, kv_tile, q_side, kv_side = _query_major_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, q_side, kv_side)
    inputs = [q, k, v, *mask_arrays]
    scratch = [pltpu.VMEM((t.block_q, 1), jnp.float32), pltpu.VMEM((t.block_q, 1), jnp.float32),
               pltpu.VMEM((t.block_q, dim), jnp.float32)]
    return _call(_forward_kernel, t, (batch, heads, t.blocks_q, t.blocks_k), (masks.kv_range_lo, masks.kv_range_hi),
                 inputs, [q_tile, kv_tile, kv_tile, *mask_specs],
                 (jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, t.padded_q, 1), jnp.float32)),
                 (q_tile, stat_tile), scratch, _cost(t, batch, heads, dim, 2, inputs))


def backward(q, k, v, masks: BlockMask, t: Tiling, lse, delta, d_out):
    """(dq, dk, dv) in the dtypes of q, k, v; `delta` is rowsum(dO * O) in float32."""
    batch, heads, _, dim = q.shape
    q_tile, stat_tile, kv_tile, q_side, kv_side = _query_major_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, q_side, kv_side)
    inputs = [q, k, v, *mask_arrays, d_out, lse, delta]
    dq = _call(_dq_kernel, t, (batch, heads, t.blocks_q, t.blocks_k), (masks.kv_range_lo, masks.kv_range_hi),
               inputs, [q_tile, kv_tile, kv_tile, *mask_specs, q_tile, stat_tile, stat_tile],
               jax.ShapeDtypeStruct(q.shape, q.dtype), q_tile, [pltpu.VMEM((t.block_q, dim), jnp.float32)],
               _cost(t, batch, heads, dim, 3, inputs))

    kv_heads = k.shape[1]
    q_tile, stat_tile, kv_tile, q_side, kv_side = _key_major_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, q_side, kv_side)
    inputs = [q, k, v, *mask_arrays, d_out, lse, delta]
    accumulators = [pltpu.VMEM((t.block_k, dim), jnp.float32)] * 2
    dk, dv = _call(_dkv_kernel, t, (batch, kv_heads, t.blocks_k, t.groups * t.blocks_q),
                   (masks.q_range_lo, masks.q_range_hi), inputs,
                   [q_tile, kv_tile, kv_tile, *mask_specs, q_tile, stat_tile, stat_tile],
                   (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                   (kv_tile, kv_tile), accumulators, _cost(t, batch, heads, dim, 4, inputs))
    return dq, dk, dv
