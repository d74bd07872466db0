"""Attention dispatch: every attention layer of every model calls `dot_product_attention`.

Shape key: B batch, T query length, S key length, H heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def dot_product_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxHxD: jax.Array,
    v_BxSxHxD: jax.Array,
    *,
    mask_BxTxS: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention with float32 logits; returns [B, T, H, D] in the dtype of `q`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose from {IMPLEMENTATIONS}")
    if q_BxTxHxD.shape[-1] != k_BxSxHxD.shape[-1] or k_BxSxHxD.shape != v_BxSxHxD.shape:
        raise ValueError(
            f"attention shapes disagree: q {q_BxTxHxD.shape}, k {k_BxSxHxD.shape}, v {v_BxSxHxD.shape}")
    scale = q_BxTxHxD.shape[-1] ** -0.5
    logits_BxHxTxS = jnp.einsum(
        "bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD, preferred_element_type=jnp.float32) * scale
    if mask_BxTxS is not None:
        logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs_BxHxTxS, v_BxSxHxD)
