"""Flash attention in Pallas: tiled forward and backward with an online softmax, under `jax.custom_vjp`.

One interface, two kernel layouts: on TPU (`flash_tpu.py`, Mosaic) keys and values stream through VMEM one
block per grid step, so any length compiles; on GPU (`flash_resident.py`, Triton) and in interpret mode each
program loops over the rows of one head. Both visit only the blocks the mask leaves visible
(`flash_masks.BlockMask`) and compute each tile the same way (`flash_tiles.py`). The forward saves the per-row
log-sum-exp; the backward recomputes the probabilities from it (FlashAttention-2). Accumulation is float32 for
float32 and bfloat16 inputs; rows with no visible key give zeros.

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vlm_jax.kernels import flash_resident, flash_tpu
from vlm_jax.kernels.flash_masks import BlockMask, build_block_mask
from vlm_jax.kernels.flash_tiles import Tiling
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.kernels.padding import pad_to, round_up

PLATFORMS = ("interpret", "tpu", "gpu")
_KERNELS = {"interpret": flash_resident, "gpu": flash_resident, "tpu": flash_tpu}


def _tiling(q_shape, k_shape, mask: MaskSpec, platform: str, block: int, softcap: float | None,
            vmem_limit_bytes: int | None) -> Tiling:
    length_q, length_k = q_shape[2], k_shape[2]
    if platform == "tpu":  # lane-aligned blocks; a short sequence is one block
        if block % flash_tpu.LANES:
            raise ValueError(f"TPU flash-attention blocks must be multiples of {flash_tpu.LANES}, not {block}")
        block_q = min(block, round_up(length_q, flash_tpu.LANES))
        block_k = min(block, round_up(length_k, flash_tpu.LANES))
    else:
        block_q = min(block, max(16, pl.next_power_of_2(length_q)))
        block_k = min(block, max(16, pl.next_power_of_2(length_k)))
    padded_q, padded_k = round_up(length_q, block_q), round_up(length_k, block_k)
    if platform == "gpu":  # Triton blocks are powers of two, and one block spans the whole sequence
        padded_q, padded_k = pl.next_power_of_2(padded_q), pl.next_power_of_2(padded_k)
    return Tiling(block_q, block_k, padded_q, padded_k, q_shape[1] // k_shape[1], q_shape[3] ** -0.5,
                  platform, mask.q_segment_ids_BxT is not None, mask.window is not None, softcap, vmem_limit_bytes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, masks: BlockMask, t: Tiling):
    return _KERNELS[t.platform].forward(q, k, v, masks, t)[0]


def _flash_fwd(q, k, v, masks: BlockMask, t: Tiling):
    out, lse = _KERNELS[t.platform].forward(q, k, v, masks, t)
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(t: Tiling, residuals, d_out):
    q, k, v, masks, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = _KERNELS[t.platform].backward(q, k, v, masks, t, lse, delta, d_out.astype(q.dtype))
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask: MaskSpec,
                    *, platform: str = "interpret", block: int = 128, softcap: float | None = None,
                    vmem_limit_bytes: int | None = None) -> jax.Array:
    """Fused attention for any mask kind; returns [B, T, H, D] in q's dtype (differentiable in q, k, v).

    `platform` is where the kernel runs: "tpu" (Mosaic), "gpu" (Triton) or "interpret" (CPU, tests).
    `softcap` soft-caps the scaled logits: softcap * tanh(logits / softcap) (Gemma 2).
    `vmem_limit_bytes` caps each TPU kernel's VMEM (the compiler refuses a kernel that needs more)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown Pallas platform {platform!r}; choose from {PLATFORMS}")
    batch, length_q, _, dim = q_BxTxHxD.shape
    length_k = k_BxSxKxD.shape[1]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD))
    t = _tiling(q.shape, k.shape, mask, platform, block, softcap, vmem_limit_bytes)
    padded_dim = pl.next_power_of_2(max(dim, 16)) if platform == "gpu" else dim
    q = pad_to(q, {2: t.padded_q, 3: padded_dim})
    k, v = (pad_to(x, {2: t.padded_k, 3: padded_dim}) for x in (k, v))
    masks = build_block_mask(mask, batch, length_q, length_k, t.padded_q, t.padded_k, t.block_q, t.block_k)
    out = _flash(q, k, v, masks, t)
    return jnp.swapaxes(out[:, :, :length_q, :dim], 1, 2)
