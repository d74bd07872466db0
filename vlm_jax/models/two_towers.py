"""Two-tower image-text model (CLIP, ALIGN, SigLIP, LiT).

Shape key: B batch, E joint embedding width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.layers import dense
from vlm_jax.models.text import TextConfig, TextEncoder
from vlm_jax.models.vit import ViT, ViTConfig

# Initial temperature and bias (log of the logit scale) for each loss, from the CLIP and SigLIP papers.
INIT_LOGIT_SCALE = {"softmax": math.log(1 / 0.07), "sigmoid": math.log(10.0)}
INIT_LOGIT_BIAS = -10.0


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTowers(nnx.Module):
    """Image and text towers, linear projections to a joint space (the image one optional, as in SigLIP),
    L2-normalised embeddings, a learnable log logit scale `t` and, for the sigmoid loss, a learnable logit bias `b`."""

    def __init__(self, image: ViTConfig, text: TextConfig, embed_dim: int, loss: str, rngs: nnx.Rngs,
                 image_projection: bool = True, proj_bias: bool = True):
        if loss not in INIT_LOGIT_SCALE:
            raise ValueError(f"unknown contrastive loss {loss!r}; choose from {tuple(INIT_LOGIT_SCALE)}")
        self.image_encoder = ViT(image, rngs)
        self.text_encoder = TextEncoder(text, rngs)
        if not image_projection and embed_dim != self.image_encoder.width:
            raise ValueError(f"without an image projection model.embed_dim ({embed_dim}) must equal the image "
                             f"tower's width ({self.image_encoder.width})")
        self.image_proj = (dense(self.image_encoder.width, embed_dim, ("embed", "proj"), image.dtype, rngs,
                                 use_bias=proj_bias) if image_projection else None)
        self.text_proj = dense(text.encoder_spec().width, embed_dim, ("embed", "proj"), text.dtype, rngs,
                               use_bias=proj_bias)
        self.logit_scale = nnx.Param(jnp.asarray(INIT_LOGIT_SCALE[loss], jnp.float32))
        if loss == "sigmoid":
            self.logit_bias = nnx.Param(jnp.asarray(INIT_LOGIT_BIAS, jnp.float32))

    def embed_image(self, image_BxHxWx3: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """L2-normalised float32 image embeddings [B, E]; `rngs` (training only) draw the ViT's patch dropout."""
        pooled_BxD = self.image_encoder(image_BxHxWx3, rngs)
        return l2_normalize(pooled_BxD if self.image_proj is None else self.image_proj(pooled_BxD))

    def embed_text(self, tokens_BxL: jax.Array) -> jax.Array:
        """L2-normalised float32 text embeddings [B, E]."""
        return l2_normalize(self.text_proj(self.text_encoder(tokens_BxL)))

    def temperature(self) -> tuple[jax.Array, jax.Array | None]:
        """(log logit scale, logit bias or None)."""
        bias = self.logit_bias[...] if hasattr(self, "logit_bias") else None
        return self.logit_scale[...], bias

    def __call__(self, image_BxHxWx3: jax.Array, tokens_BxL: jax.Array):
        """(image embeddings, text embeddings, log logit scale, logit bias or None)."""
        return (self.embed_image(image_BxHxWx3), self.embed_text(tokens_BxL), *self.temperature())
