"""Vision Transformer image encoder, sized by name ("B/16", "So400m/14", ...).

Shape key: B batch, H/W image height/width, N patches, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.layers import (Encoder, EncoderSpec, MapHead, TowerOptions, layer_norm, parse_size, partitioned,
                                   sincos_2d)
from vlm_jax.models.token_dropout import check_rate, drop_tokens

POOLS = ("map", "gap", "tok", "none")  # none: every patch token [B, N, D] (for decoders)
POSEMBS = ("learn", "sincos2d")


def parse_variant(variant: str) -> tuple[str, int]:
    """'B/16' -> ('B', 16)."""
    name, sep, patch = variant.partition("/")
    if not sep or not patch.isdigit():
        raise ValueError(f"image variant {variant!r} must look like 'B/16' (size/patch)")
    parse_size(name)
    return name, int(patch)


@dataclasses.dataclass(frozen=True)
class ViTConfig(TowerOptions):
    variant: str = "B/16"
    image_size: int = 224
    pool: str = "map"
    posemb: str = "learn"
    pre_norm: bool = False  # a LayerNorm before the encoder (OpenAI CLIP's `ln_pre`)
    patch_bias: bool = True  # OpenAI CLIP's patch embedding has none
    cls_token: bool = False  # a class token whatever the pool (OpenAI CLIP); pool "tok" always has one
    patch_dropout: float = 0.0  # training: this share of patch tokens dropped per example before the encoder (FLIP)

    @property
    def has_cls_token(self) -> bool:
        return self.cls_token or self.pool == "tok"

    def encoder_spec(self) -> EncoderSpec:
        return self.spec_for(parse_variant(self.variant)[0])


class ViT(nnx.Module):
    """Patch embedding + position embedding (+ LayerNorm) + pre-LN encoder + pooling; returns [B, D] ([B, N, D]
    unpooled)."""

    def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
        if config.pool not in POOLS:
            raise ValueError(f"unknown image pool {config.pool!r}; choose from {POOLS}")
        if config.posemb not in POSEMBS:
            raise ValueError(f"unknown posemb {config.posemb!r}; choose from {POSEMBS}")
        check_rate(config.patch_dropout, "model.image.patch_dropout")
        patch = parse_variant(config.variant)[1]
        if config.image_size % patch:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch size {patch}")
        spec = config.encoder_spec()
        self.config, self.width = config, spec.width
        self.grid = config.image_size // patch
        self.patch_embed = nnx.Conv(
            3, spec.width, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID",
            use_bias=config.patch_bias, dtype=config.dtype, param_dtype=jnp.float32, rngs=rngs,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)))
        num_tokens = self.grid**2 + config.has_cls_token
        if config.has_cls_token:
            self.cls_token = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("embed",))(
                rngs.params(), (spec.width,), jnp.float32))
        if config.posemb == "learn":
            self.posemb = nnx.Param(partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
                rngs.params(), (num_tokens, spec.width), jnp.float32))
        if config.pre_norm:
            self.ln_pre = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.encoder = Encoder(spec, rngs)
        if config.pool == "map":
            self.map_head = MapHead(spec, rngs)

    def __call__(self, image_BxHxWx3: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Float pixels are used as given; uint8 pixels (4x less host-to-device traffic) map to [-1, 1].

        Training passes `rngs`: with `patch_dropout` > 0 each example then keeps a random share of its patch tokens
        (a class token always), drawn from `rngs.dropout()` after the position embedding; pool "none" returns the
        kept patch tokens [B, K, D]. Without `rngs` (evaluation, inference) every token stays."""
        cfg = self.config
        x_BxNxD = self.embed(image_BxHxWx3)
        if rngs is not None and cfg.patch_dropout > 0:
            x_BxNxD = drop_tokens(x_BxNxD, rngs.dropout(), cfg.patch_dropout, always_keep=int(cfg.has_cls_token))
        return self.encode(x_BxNxD)

    def embed(self, image_BxHxWx3: jax.Array) -> jax.Array:
        """Patch embeddings with the class token (if any) first and the position embedding added, [B, N, D]."""
        cfg = self.config
        if image_BxHxWx3.dtype == jnp.uint8:
            image_BxHxWx3 = image_BxHxWx3.astype(jnp.float32) * (2 / 255) - 1
        x = self.patch_embed(image_BxHxWx3.astype(cfg.dtype))
        x_BxNxD = x.reshape(x.shape[0], -1, self.width)
        if cfg.has_cls_token:
            cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(cfg.dtype), (x.shape[0], 1, self.width))
            x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        if cfg.posemb == "learn":
            x_BxNxD = x_BxNxD + self.posemb[...].astype(cfg.dtype)
        else:
            posemb = sincos_2d(self.grid, self.grid, self.width)
            x_BxNxD = x_BxNxD.at[:, x_BxNxD.shape[1] - self.grid**2:].add(posemb.astype(cfg.dtype))
        return x_BxNxD

    def encode(self, x_BxNxD: jax.Array) -> jax.Array:
        """(LayerNorm +) encoder blocks + pooling of embedded tokens."""
        cfg = self.config
        if cfg.pre_norm:
            x_BxNxD = self.ln_pre(x_BxNxD)
        x_BxNxD = self.encoder(x_BxNxD)
        if cfg.pool == "map":
            return self.map_head(x_BxNxD)
        if cfg.pool == "gap":
            return x_BxNxD.mean(axis=1)
        if cfg.pool == "none":  # the patch tokens (a class token took part in attention only)
            return x_BxNxD[:, int(cfg.has_cls_token):]
        return x_BxNxD[:, 0]
