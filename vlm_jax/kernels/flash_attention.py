"""Flash attention in Pallas: tiled forward and backward with an online softmax, under `jax.custom_vjp`.

One kernel source lowers to Mosaic on TPU and to Triton on GPU, and runs in interpret mode on CPU. Each program
owns one (batch, head, block) tile and loops over the key (or, in the key/value gradient, query) blocks that
the mask leaves visible (`flash_masks.BlockMask`), so masked-out blocks are skipped, not computed. The forward
saves the per-row log-sum-exp; the backward recomputes the probabilities from it (FlashAttention-2).
Accumulation is float32 for float32 and bfloat16 inputs; rows with no visible key give zeros.

Layout inside: [B, H, T, D]; the key/value block of one head stays resident for the whole loop (on TPU it must
fit VMEM: `resident_bytes`), so very long sequences on TPU go to splash instead (see attention.py).

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vlm_jax.kernels.flash_masks import BlockMask, build_block_mask
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.kernels.padding import pad_to, round_up

PLATFORMS = ("interpret", "tpu", "gpu")
_NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b
_PRECISION = jax.lax.Precision.HIGHEST  # exact float32 products on TPU and GPU too


def _dot(a: jax.Array, b: jax.Array, dimensions) -> jax.Array:
    """A matmul inside a kernel, accumulated in float32."""
    return jax.lax.dot_general(a, b, dimensions, precision=_PRECISION, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static facts about one call: block sizes, padded lengths, heads per key/value head, where it runs."""
    block_q: int
    block_k: int
    padded_q: int
    padded_k: int
    groups: int
    scale: float
    platform: str
    segments: bool


def _tiling(q_shape, k_shape, has_segments: bool, platform: str, block: int) -> _Tiling:
    length_q, length_k = q_shape[2], k_shape[2]
    block_q = min(block, max(16, pl.next_power_of_2(length_q)))
    block_k = block if platform == "tpu" else min(block, max(16, pl.next_power_of_2(length_k)))
    padded_q, padded_k = round_up(length_q, block_q), round_up(length_k, block_k)
    if platform == "gpu":  # Triton blocks are powers of two, and one block spans the whole sequence
        padded_q, padded_k = pl.next_power_of_2(padded_q), pl.next_power_of_2(padded_k)
    return _Tiling(block_q, block_k, padded_q, padded_k, q_shape[1] // k_shape[1], q_shape[3] ** -0.5,
                   platform, has_segments)


def resident_bytes(length_k: int, head_dim: int, itemsize: int, block: int = 128) -> int:
    """VMEM one program holds on TPU: the key and value (or query and output-gradient) rows of one head,
    double-buffered."""
    return 2 * 2 * round_up(length_k, block) * head_dim * itemsize


# ----------------------------------------------------------------------------------------------- kernels

def _visible(limit_Qx1, key_block, q_segments_Qx1, kv_segments_ref, block_k: int):
    """bool [block_q, block_k]: key position < the query's limit, and the same segment when packed."""
    key_positions = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    visible = key_positions < limit_Qx1
    if kv_segments_ref is not None:
        visible = visible & (q_segments_Qx1 == kv_segments_ref[pl.ds(key_block, 1), :])
    return visible


def _key_block(k_ref, v_ref, j, t: _Tiling):
    """Keys and values of key block `j` from the resident rows of one head."""
    rows = pl.ds(pl.multiple_of(j * t.block_k, t.block_k), t.block_k)
    return k_ref[rows, :], v_ref[rows, :]


def _split_mask_refs(refs, segments: bool):
    if segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _forward_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: _Tiling):
    q_segment_ref, kv_segment_ref, (out_ref, lse_ref) = _split_mask_refs(refs, t.segments)
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    q, limit = q_ref[...], limit_ref[...]
    q_segments = None if q_segment_ref is None else q_segment_ref[...]

    def visit(j, carry):
        row_max, row_sum, acc = carry
        k, v = _key_block(k_ref, v_ref, j, t)
        logits = _dot(q, k, _NT)
        visible = _visible(limit, j, q_segments, kv_segment_ref, t.block_k)
        logits = jnp.where(visible, logits * t.scale, _NEG)
        new_max = jnp.maximum(row_max, logits.max(axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(logits - new_max), 0.0)
        correction = jnp.exp(row_max - new_max)
        acc = acc * correction + _dot(probs.astype(v.dtype), v, _NN)
        return new_max, row_sum * correction + probs.sum(axis=1, keepdims=True), acc

    shape = (t.block_q, 1)
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(out_ref.shape, jnp.float32))
    row_max, row_sum, acc = jax.lax.fori_loop(kv_lo_ref[row], kv_hi_ref[row], visit, init)
    has_keys = row_sum > 0
    out_ref[...] = (acc / jnp.where(has_keys, row_sum, 1.0)).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), jnp.inf)


def _probs_and_dlogits(q, k, v, d_out, lse, delta, visible, t: _Tiling):
    """Recomputed probabilities and the logit gradient of one [block_q, block_k] tile."""
    logits = _dot(q, k, _NT)
    probs = jnp.where(visible, jnp.exp(logits * t.scale - lse), 0.0)
    d_probs = _dot(d_out, v, _NT)
    return probs, probs * (d_probs - delta)


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: _Tiling):
    q_segment_ref, kv_segment_ref, (d_out_ref, lse_ref, delta_ref, dq_ref) = _split_mask_refs(refs, t.segments)
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    q, d_out, lse, delta, limit = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...], limit_ref[...]
    q_segments = None if q_segment_ref is None else q_segment_ref[...]

    def visit(j, dq):
        k, v = _key_block(k_ref, v_ref, j, t)
        visible = _visible(limit, j, q_segments, kv_segment_ref, t.block_k)
        _, d_logits = _probs_and_dlogits(q, k, v, d_out, lse, delta, visible, t)
        return dq + _dot(d_logits.astype(k.dtype), k, _NN)

    dq = jax.lax.fori_loop(kv_lo_ref[row], kv_hi_ref[row], visit, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * t.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, limit_ref, *refs, t: _Tiling):
    q_segment_ref, kv_segment_ref, rest = _split_mask_refs(refs, t.segments)
    d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    row = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    key_block = pl.program_id(2)

    def visit(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * t.block_q, t.block_q), t.block_q)
        q, d_out = q_ref[rows, :], d_out_ref[rows, :]
        q_segments = None if q_segment_ref is None else q_segment_ref[rows, :]
        visible = _visible(limit_ref[rows, :], key_block, q_segments, kv_segment_ref, t.block_k)
        probs, d_logits = _probs_and_dlogits(q, k, v, d_out, lse_ref[rows, :], delta_ref[rows, :], visible, t)
        dv = dv + _dot(probs.astype(d_out.dtype), d_out, _TN)
        dk = dk + _dot(d_logits.astype(q.dtype), q, _TN)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(q_lo_ref[row], q_hi_ref[row], visit, (zeros, zeros))
    dk_ref[...] = (dk * t.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ pallas calls

def _pallas(kernel, t: _Tiling, grid, tables, inputs, in_specs, out_shapes, out_specs):
    """pallas_call for the platform: the two int32 loop-range tables go to scalar memory on TPU (scalar
    prefetch) and are plain inputs elsewhere."""
    kernel = functools.partial(kernel, t=t)
    if t.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                                 out_specs=out_specs)
        q = inputs[0]
        resident = resident_bytes(max(t.padded_q, t.padded_k), q.shape[-1], q.dtype.itemsize, t.block_k)
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3,
                                      vmem_limit_bytes=32 * 2**20 + 2 * resident)
        return pl.pallas_call(kernel, out_shape=out_shapes, grid_spec=grid_spec, compiler_params=params)(
            *tables, *inputs)
    if t.platform == "gpu":
        from jax.experimental.pallas import triton as pltriton
        params, interpret = pltriton.CompilerParams(num_warps=4, num_stages=2), False
        tables = [pad_to(x, {0: pl.next_power_of_2(x.size)}) for x in tables]
    else:
        params, interpret = None, True
    table_specs = [pl.BlockSpec(x.shape, lambda *_: (0,)) for x in tables]
    return pl.pallas_call(kernel, out_shape=out_shapes, grid=grid, in_specs=table_specs + in_specs,
                          out_specs=out_specs, compiler_params=params, interpret=interpret)(*tables, *inputs)


def _mask_inputs(masks: BlockMask, t: _Tiling, query_blocked: bool):
    """Mask arrays and specs; `query_blocked` means the grid walks query blocks (forward, dq)."""
    if query_blocked:
        q_side = pl.BlockSpec((None, t.block_q, 1), lambda b, h, i, *_: (b, i, 0))
    else:
        q_side = pl.BlockSpec((None, t.padded_q, 1), lambda b, h, j, *_: (b, 0, 0))
    kv_side = pl.BlockSpec((None, t.padded_k // t.block_k, t.block_k), lambda b, h, i, *_: (b, 0, 0))
    arrays, specs = [masks.key_limit_BxTx1], [q_side]
    if t.segments:
        arrays += [masks.q_segments_BxTx1, masks.kv_segments_BxNxC]
        specs += [q_side, kv_side]
    return arrays, specs


def _query_blocked_specs(t: _Tiling, dim: int):
    """Block specs of the grids that walk query blocks (forward, dq): a query tile, one head's whole keys or
    values (shared by the G query heads of a group), a per-row statistics tile."""
    q_tile = pl.BlockSpec((None, None, t.block_q, dim), lambda b, h, i, *_: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, t.padded_k, dim), lambda b, h, i, *_: (b, jax.lax.div(h, t.groups), 0, 0))
    stat_tile = pl.BlockSpec((None, None, t.block_q, 1), lambda b, h, i, *_: (b, h, i, 0))
    return q_tile, kv_all, stat_tile


def _forward(q, k, v, masks: BlockMask, t: _Tiling):
    batch, heads, _, dim = q.shape
    q_tile, kv_all, stat_tile = _query_blocked_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, query_blocked=True)
    return _pallas(
        _forward_kernel, t, (batch, heads, t.padded_q // t.block_q), (masks.kv_range_lo, masks.kv_range_hi),
        [q, k, v, *mask_arrays], [q_tile, kv_all, kv_all, *mask_specs],
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, t.padded_q, 1), jnp.float32)),
        (q_tile, stat_tile))


def _backward(q, k, v, masks: BlockMask, t: _Tiling, out, lse, d_out):
    batch, heads, _, dim = q.shape
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    q_tile, kv_all, stat_tile = _query_blocked_specs(t, dim)
    mask_arrays, mask_specs = _mask_inputs(masks, t, query_blocked=True)
    dq = _pallas(
        _dq_kernel, t, (batch, heads, t.padded_q // t.block_q), (masks.kv_range_lo, masks.kv_range_hi),
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
        _dkv_kernel, t, (batch, heads, t.padded_k // t.block_k), (masks.q_range_lo, masks.q_range_hi),
        [q, k, v, *mask_arrays, d_out, lse, delta],
        [q_all, kv_tile, kv_tile, *mask_specs, q_all, stat_all, stat_all],
        (per_head, per_head), (grad_tile, grad_tile))
    kv_heads = k.shape[1]  # grouped-query heads: sum the per-query-head gradients of each shared head
    dk = dk.reshape(batch, kv_heads, t.groups, t.padded_k, dim).sum(2).astype(k.dtype)
    dv = dv.reshape(batch, kv_heads, t.groups, t.padded_k, dim).sum(2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, masks: BlockMask, t: _Tiling):
    return _forward(q, k, v, masks, t)[0]


def _flash_fwd(q, k, v, masks: BlockMask, t: _Tiling):
    out, lse = _forward(q, k, v, masks, t)
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(t: _Tiling, residuals, d_out):
    q, k, v, masks, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, masks, t, out, lse, d_out)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask: MaskSpec,
                    *, platform: str = "interpret", block: int = 128) -> jax.Array:
    """Fused attention for any mask kind; returns [B, T, H, D] in q's dtype (differentiable in q, k, v)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown Pallas platform {platform!r}; choose from {PLATFORMS}")
    batch, length_q, _, dim = q_BxTxHxD.shape
    length_k = k_BxSxKxD.shape[1]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD))
    t = _tiling(q.shape, k.shape, mask.q_segment_ids_BxT is not None, platform, block)
    padded_dim = pl.next_power_of_2(max(dim, 16)) if platform == "gpu" else dim
    q = pad_to(q, {2: t.padded_q, 3: padded_dim})
    k, v = (pad_to(x, {2: t.padded_k, 3: padded_dim}) for x in (k, v))
    masks = build_block_mask(mask, batch, length_q, length_k, t.padded_q, t.padded_k, t.block_q, t.block_k)
    out = _flash(q, k, v, masks, t)
    return jnp.swapaxes(out[:, :, :length_q, :dim], 1, 2)
