"""Contrastive image-text losses on L2-normalised embeddings.

Shape key: B batch, E embedding width. `log_scale` is the log of the logit scale (temperature^-1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its logit scale at 100.


def softmax_contrastive_loss(zimg_BxE: jax.Array, ztxt_BxE: jax.Array, log_scale: jax.Array,
                             bias: jax.Array | None = None) -> jax.Array:
    """CLIP / ALIGN: mean of image->text and text->image cross-entropy over the batch.

    The scale exp(log_scale) is clamped at 100 (no gradient to `log_scale` beyond it), as CLIP does.
    """
    del bias
    scale = jnp.exp(jnp.minimum(log_scale, math.log(MAX_LOGIT_SCALE)))
    logits_BxB = scale * zimg_BxE @ ztxt_BxE.T
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_BxB, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits_BxB, axis=0)))
    return 0.5 * (image_to_text + text_to_image)


def sigmoid_contrastive_loss(zimg_BxE: jax.Array, ztxt_BxE: jax.Array, log_scale: jax.Array,
                             bias: jax.Array) -> jax.Array:
    """SigLIP: every image-text pair is a binary problem; summed over texts, averaged over images."""
    logits_BxB = jnp.exp(log_scale) * zimg_BxE @ ztxt_BxE.T + bias
    labels_BxB = 2.0 * jnp.eye(logits_BxB.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels_BxB * logits_BxB)) / logits_BxB.shape[0]


LOSSES = {"softmax": softmax_contrastive_loss, "sigmoid": sigmoid_contrastive_loss}
