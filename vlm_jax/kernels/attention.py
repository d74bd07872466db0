"""Attention dispatch: every attention layer of every model calls `dot_product_attention`.

Implementations: "xla" (einsum + softmax, T x S logits) and "blockwise" (scan over key blocks with an online
softmax, linear memory; kernels/blockwise.py). Masks are structured (`MaskSpec`: causal, prefix-LM, segment
ids) so every implementation can evaluate them per block; "xla" also takes a dense boolean mask.

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.masks import MaskSpec

IMPLEMENTATIONS = ("xla", "blockwise")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(want [B, T, H, D], [B, S, K, D], [B, S, K, D])")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if mask is not None and mask.q_segment_ids_BxT is not None:
        if mask.q_segment_ids_BxT.shape != q.shape[:2] or mask.kv_segment_ids_BxS.shape != k.shape[:2]:
            raise ValueError(f"segment ids {mask.q_segment_ids_BxT.shape} / {mask.kv_segment_ids_BxS.shape} do "
                             f"not match query {q.shape[:2]} / key {k.shape[:2]} lengths")


def dot_product_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    mask_BxTxS: jax.Array | None = None,
    mask: MaskSpec | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention with float32 logits; returns [B, T, H, D] in the dtype of `q`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose from {IMPLEMENTATIONS}")
    _check_shapes(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)
    if impl == "blockwise":
        if mask_BxTxS is not None:
            raise ValueError("blockwise attention takes a structured MaskSpec, not a dense mask")
        return blockwise_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask or MaskSpec())
    groups = q_BxTxHxD.shape[2] // k_BxSxKxD.shape[2]
    k_BxSxHxD = jnp.repeat(k_BxSxKxD, groups, axis=2)
    v_BxSxHxD = jnp.repeat(v_BxSxKxD, groups, axis=2)
    if mask is not None:
        dense = mask.dense(q_BxTxHxD.shape[1], k_BxSxKxD.shape[1])
        mask_BxTxS = dense if mask_BxTxS is None else mask_BxTxS & dense
    scale = q_BxTxHxD.shape[-1] ** -0.5
    logits_BxHxTxS = jnp.einsum(
        "bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD, preferred_element_type=jnp.float32) * scale
    if mask_BxTxS is not None:
        logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs_BxHxTxS, v_BxSxHxD)
