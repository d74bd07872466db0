"""Memory-efficient attention in plain XLA: a scan over key blocks with an online softmax.

For backends without a fused kernel: the T x S logits are never materialised, only T x block at a time, so
attention memory grows linearly with the sequence length (Rabe & Staats 2021; the flash-attention recurrence).
The scan body is rematerialised, so the backward pass keeps only the running statistics per block.

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.kernels.padding import pad_to, round_up

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def blockwise_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask: MaskSpec,
                        block_size: int = 512, softcap: float | None = None) -> jax.Array:
    """Softmax attention, float32 statistics, logits soft-capped when `softcap` is set; returns [B, T, H, D]
    in q's dtype. Rows with no visible key return zeros."""
    batch, length_q, heads, dim = q_BxTxHxD.shape
    length_k, kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    groups = heads // kv_heads
    block = min(block_size, length_k)
    padded = round_up(length_k, block)
    k_blocks = pad_to(k_BxSxKxD, {1: padded}).reshape(batch, padded // block, block, kv_heads, dim)
    v_blocks = pad_to(v_BxSxKxD, {1: padded}).reshape(batch, padded // block, block, kv_heads, dim)
    q_BxTxKxGxD = q_BxTxHxD.reshape(batch, length_q, kv_heads, groups, dim) * dim ** -0.5

    @jax.checkpoint
    def step(carry, inputs):
        max_BxKxGxT, sum_BxKxGxT, acc_BxKxGxTxD = carry
        index, k_BxNxKxD, v_BxNxKxD = inputs
        logits = jnp.einsum("btkgd,bnkd->bkgtn", q_BxTxKxGxD, k_BxNxKxD, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        key_positions = index * block + jnp.arange(block)
        visible_BxTxN = mask.visible(jnp.arange(length_q), key_positions) & (key_positions < length_k)
        logits = jnp.where(visible_BxTxN[:, None, None], logits, _NEG)
        new_max = jnp.maximum(max_BxKxGxT, logits.max(-1))
        probs = jnp.exp(logits - new_max[..., None]) * visible_BxTxN[:, None, None]
        correction = jnp.exp(max_BxKxGxT - new_max)
        new_sum = sum_BxKxGxT * correction + probs.sum(-1)
        new_acc = acc_BxKxGxTxD * correction[..., None] + jnp.einsum(
            "bkgtn,bnkd->bkgtd", probs.astype(v_BxNxKxD.dtype), v_BxNxKxD, preferred_element_type=jnp.float32)
        return (new_max, new_sum, new_acc), None

    stats = (batch, kv_heads, groups, length_q)
    init = (jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, dim), jnp.float32))
    inputs = (jnp.arange(padded // block), jnp.moveaxis(k_blocks, 1, 0), jnp.moveaxis(v_blocks, 1, 0))
    (_, total, acc), _ = jax.lax.scan(step, init, inputs)
    out_BxKxGxTxD = acc / jnp.maximum(total, 1e-30)[..., None]
    return jnp.moveaxis(out_BxKxGxTxD.reshape(batch, heads, length_q, dim), 1, 2).astype(q_BxTxHxD.dtype)
