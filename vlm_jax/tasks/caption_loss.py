"""Teacher forcing and the token cross-entropy of every captioning objective (captioning, CapPa, CoCa).

Token ids follow the tokenizers trained here (data_pipelines/tokenizer.py): 0 pad, 1 EOS, 3 BOS. A caption
arrives as the pipeline's `text`: ids, EOS, then padding.

Shape key: B batch, L tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_ID, EOS_ID, BOS_ID = 0, 1, 3
REDUCTIONS = ("example", "token")


def teacher_forcing(text_BxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(decoder input, targets, loss mask): the input is BOS then the targets shifted right (position i predicts
    token i having seen tokens < i); the mask is 1 on the caption's ids and its EOS, 0 on padding."""
    mask_BxL = (text_BxL != PAD_ID).astype(jnp.float32)
    shifted_BxL = jnp.concatenate([jnp.full_like(text_BxL[:, :1], BOS_ID), text_BxL[:, :-1]], axis=1)
    inputs_BxL = jnp.where(mask_BxL > 0, shifted_BxL, PAD_ID)
    return inputs_BxL, text_BxL, mask_BxL


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy [B, L] in float32; with label smoothing e the target distribution is
    (1 - e) one-hot + e uniform."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll_BxL = (1 - label_smoothing) * nll_BxL - label_smoothing * jnp.mean(logp_BxLxV, axis=-1)
    return nll_BxL


def caption_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array, reduction: str,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) over the supervised tokens: "example" averages each caption's tokens then the batch
    (big_vision), "token" averages every supervised token of the batch (open_clip). Metrics are unsmoothed."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown caption loss reduction {reduction!r}; choose from {REDUCTIONS}")
    per_token = token_nll(logits_BxLxV, targets_BxL, label_smoothing) * mask_BxL
    tokens_B = jnp.sum(mask_BxL, axis=1)
    if reduction == "example":
        loss = jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(tokens_B, 1))
    else:
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(tokens_B), 1)
    plain = per_token if not label_smoothing else token_nll(logits_BxLxV, targets_BxL) * mask_BxL
    correct = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL) * mask_BxL
    total = jnp.maximum(jnp.sum(tokens_B), 1)
    return loss, {"token_nll": jnp.sum(plain) / total, "token_accuracy": jnp.sum(correct) / total}


def sequence_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """(summed NLL of each sequence's supervised tokens [B], their count [B]): for perplexity and scoring."""
    return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * mask_BxL, axis=1), jnp.sum(mask_BxL, axis=1)


def caption_loss_weight(text_BxL: jax.Array, reduction: str) -> jax.Array:
    """A micro-batch's share of the caption loss when accumulating: its rows (per-example mean) or its supervised
    tokens (per-token mean)."""
    if reduction == "token":
        return jnp.sum(text_BxL != PAD_ID)
    return jnp.asarray(text_BxL.shape[0])
