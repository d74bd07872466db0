"""Flash-attention kernels for GPU (Triton) and interpret mode: each program keeps one head's rows addressable
and loops over the blocks its mask leaves visible.

Each program owns one (batch, head, block) tile and runs a `fori_loop` over the key blocks (forward, dq) or
query blocks (dk/dv) in its [lo, hi) range from `flash_masks.BlockMask`; blocks outside the range are never
loaded. On GPU the rows live in global memory, so nothing bounds the sequence length.

Layout: [B, H, T, D]. Shape key: B batch, H query heads, K key/value heads, T / S padded lengths, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vlm_jax.kernels.flash_masks import BlockMask
from vlm_jax.kernels.flash_tiles import (NEG, NN, TN, Tiling, dot, finish_forward, online_softmax_step,
                                         probs_and_dlogits, split_mask_refs, visible)
from vlm_jax.kernels.padding import pad_to


def _key_block(k_ref, v_ref, j, t: Tiling):
    """Keys and values of key block `j` from the resident rows of one head."""
    rows = pl.ds(pl.multiple_of(j * t.block_k, t.block_k), t.block_k)
    return k_ref[rows, :], v_ref[rows, :]


def _read(ref):
    return None if ref is None else ref[...]


def _key_segments(kv_segment_ref, j):
    """The segment ids of key block `j` (one row per key block), or None without segments."""
    return None if kv_segment_ref is None else kv_segment_ref[pl.ds(j, 1), :]


def _forward_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, (out_ref, lse_ref) = split_mask_refs(refs, t)
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    q, limit, start, q_segments = q_ref[...], limit_ref[...], _read(start_ref), _read(q_segment_ref)

    def visit(j, carry):
        k, v = _key_block(k_ref, v_ref, j, t)
        mask = visible(limit, start, j, q_segments, _key_segments(kv_segment_ref, j), t.block_k)
        return online_softmax_step(q, k, v, mask, *carry, t)

    shape = (t.block_q, 1)
    init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(out_ref.shape, jnp.float32))
    carry = jax.lax.fori_loop(kv_lo_ref[row], kv_hi_ref[row], visit, init)
    out_ref[...], lse_ref[...] = finish_forward(*carry, out_ref.dtype)


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, (d_out_ref, lse_ref, delta_ref, dq_ref) = split_mask_refs(refs, t)
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    q, d_out, lse, delta, limit = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...], limit_ref[...]
    start, q_segments = _read(start_ref), _read(q_segment_ref)

    def visit(j, dq):
        k, v = _key_block(k_ref, v_ref, j, t)
        mask = visible(limit, start, j, q_segments, _key_segments(kv_segment_ref, j), t.block_k)
        _, d_logits = probs_and_dlogits(q, k, v, d_out, lse, delta, mask, t)
        return dq + dot(d_logits.astype(k.dtype), k, NN)

    dq = jax.lax.fori_loop(kv_lo_ref[row], kv_hi_ref[row], visit, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * t.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: Tiling):
    start_ref, q_segment_ref, kv_segment_ref, rest = split_mask_refs(refs, t)
    d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    key_block = pl.program_id(2)
    kv_segments = _key_segments(kv_segment_ref, key_block)

    def visit(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * t.block_q, t.block_q), t.block_q)
        q, d_out = q_ref[rows, :], d_out_ref[rows, :]
        start = None if start_ref is None else start_ref[rows, :]
        q_segments = None if q_segment_ref is None else q_segment_ref[rows, :]
        mask = visible(limit_ref[rows, :], start, key_block, q_segments, kv_segments, t.block_k)
        probs, d_logits = probs_and_dlogits(q, k, v, d_out, lse_ref[rows, :], delta_ref[rows, :], mask, t)
        dv = dv + dot(probs.astype(d_out.dtype), d_out, TN)
        dk = dk + dot(d_logits.astype(q.dtype), q, TN)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(q_lo_ref[row], q_hi_ref[row], visit, (zeros, zeros))
    dk_ref[...] = (dk * t.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _pallas(kernel, t: Tiling, grid, tables, inputs, in_specs, out_shapes, out_specs):
    """pallas_call on GPU (Triton, power-of-two tables) or in interpret mode; the two int32 loop-range tables
    come first."""
    if t.platform == "gpu":
        from jax.experimental.pallas import triton as pltriton
        params, interpret = pltriton.CompilerParams(num_warps=4, num_stages=2), False
        tables = [pad_to(x, {0: pl.next_power_of_2(x.size)}) for x in tables]
    else:
        params, interpret = None, True
    table_specs = [pl.BlockSpec(x.shape, lambda *_: (0,)) for x in tables]
    return pl.pallas_call(functools.partial(kernel, t=t), out_shape=out_shapes, grid=grid,
                          in_specs=table_specs + in_specs, out_specs=out_specs, compiler_params=params,
                          interpret=interpret)(*tables, *inputs)


def _mask_inputs(masks: BlockMask, t: Tiling, query_blocked: bool):
    """Mask arrays and specs in the order `split_mask_refs` reads them; `query_blocked` means the grid walks
    query blocks (forward, dq)."""
    if query_blocked:
        q_side = pl.BlockSpec((None, t.block_q, 1), lambda b, h, i, *_: (b, i, 0))
    else:
        q_side = pl.BlockSpec((None, t.padded_q, 1), lambda b, h, j, *_: (b, 0, 0))
    kv_side = pl.BlockSpec((None, t.blocks_k, t.block_k), lambda b, h, i, *_: (b, 0, 0))
    arrays, specs = [masks.key_limit_BxTx1], [q_side]
    if t.windowed:
        arrays, specs = arrays + [masks.key_start_BxTx1], specs + [q_side]
    if t.segments:
        arrays += [masks.q_segments_BxTx1, masks.kv_segments_BxNxC]
        specs += [q_side, kv_side]
    return arrays, specs


def _query_blocked_specs(t: Tiling, dim: int):
    """Block specs of the grids that walk query blocks (forward, dq): a query tile, one head's whole keys or
    values (shared by the G query heads of a group), a per-row statistics tile."""
    q_tile = pl.BlockSpec((None, None, t.block_q, dim), lambda b, h, i, *_: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, t.padded_k, dim), lambda b, h, i, *_: (b, jax.lax.div(h, t.groups), 0, 0))
    stat_tile = pl.BlockSpec((None, None, t.block_q, 1), lambda b, h, i, *_: (b, h, i, 0))
    return q_tile, kv_all, stat_tile


def forward(q, k, v, masks: BlockMask, t: Tiling):
    """(out [B, H, T, D], lse [B, H, T, 1] float32)."""
    batch, heads, _, dim = q.shape
    q_tile, kv_all, stat_tile = _query_blocked_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, query_blocked=True)
    return _pallas(
        _forward_kernel, t, (batch, heads, t.blocks_q), (masks.kv_range_lo, masks.kv_range_hi),
        [q, k, v, *mask_arrays], [q_tile, kv_all, kv_all, *mask_specs],
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, t.padded_q, 1), jnp.float32)),
        (q_tile, stat_tile))


def backward(q, k, v, masks: BlockMask, t: Tiling, lse, delta, d_out):
    """(dq, dk, dv) in the dtypes of q, k, v; `delta` is rowsum(dO * O) in float32."""
    batch, heads, _, dim = q.shape
    q_tile, kv_all, stat_tile = _query_blocked_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, query_blocked=True)
    dq = _pallas(
        _dq_kernel, t, (batch, heads, t.blocks_q), (masks.kv_range_lo, masks.kv_range_hi),
        [q, k, v, *mask_arrays, d_out, lse, delta],
        [q_tile, kv_all, kv_all, *mask_specs, q_tile, stat_tile, stat_tile],
        jax.ShapeDtypeStruct(q.shape, q.dtype), q_tile)

    q_all = pl.BlockSpec((None, None, t.padded_q, dim), lambda b, h, j, *_: (b, h, 0, 0))
    kv_tile = pl.BlockSpec((None, None, t.block_k, dim), lambda b, h, j, *_: (b, jax.lax.div(h, t.groups), j, 0))
    grad_tile = pl.BlockSpec((None, None, t.block_k, dim), lambda b, h, j, *_: (b, h, j, 0))
    stat_all = pl.BlockSpec((None, None, t.padded_q, 1), lambda b, h, j, *_: (b, h, 0, 0))
    mask_arrays, mask_specs = _mask_inputs(masks, t, query_blocked=False)
    per_head = jax.ShapeDtypeStruct((batch, heads, t.padded_k, dim), jnp.float32)
    dk, dv = _pallas(
        _dkv_kernel, t, (batch, heads, t.blocks_k), (masks.q_range_lo, masks.q_range_hi),
        [q, k, v, *mask_arrays, d_out, lse, delta],
        [q_all, kv_tile, kv_tile, *mask_specs, q_all, stat_all, stat_all],
        (per_head, per_head), (grad_tile, grad_tile))
    kv_heads = k.shape[1]  # grouped-query heads: sum the per-query-head gradients of each shared head
    dk = dk.reshape(batch, kv_heads, t.groups, t.padded_k, dim).sum(2).astype(k.dtype)
    dv = dv.reshape(batch, kv_heads, t.groups, t.padded_k, dim).sum(2).astype(v.dtype)
    return dq, dk, dv
