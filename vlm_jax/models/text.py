"""Text transformer encoder: bidirectional (the SigLIP / LiT text tower) or causal with pooling at the first EOS
(the OpenAI CLIP text tower).

Shape key: B batch, L tokens, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.layers import Encoder, EncoderSpec, TowerOptions, partitioned

POOLS = ("last", "first", "mean", "eos")  # eos: the first EOS token (CLIP)


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerOptions):
    size: str = "B"
    vocab_size: int = 32_000
    max_len: int = 64
    pool: str = "last"
    causal: bool = False
    eos_id: int = 1  # the tokenizer's EOS (pool "eos"); the tokenizers trained here use 1

    def encoder_spec(self) -> EncoderSpec:
        return self.spec_for(self.size)


class TextEncoder(nnx.Module):
    """Token + learned position embeddings, pre-LN encoder (causal or not), pooling; returns [B, D]."""

    def __init__(self, config: TextConfig, rngs: nnx.Rngs):
        if config.pool not in POOLS:
            raise ValueError(f"unknown text pool {config.pool!r}; choose from {POOLS}")
        spec = config.encoder_spec()
        self.config = config
        self.token_embed = nnx.Embed(
            config.vocab_size, spec.width, dtype=config.dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.posemb = nnx.Param(partitioned(nnx.initializers.normal(0.01), (None, "embed"))(
            rngs.params(), (config.max_len, spec.width), jnp.float32))
        self.encoder = Encoder(spec, rngs)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        length = tokens_BxL.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"text length {length} exceeds the model's max_len {self.config.max_len}")
        x_BxLxD = self.token_embed(tokens_BxL) + self.posemb[:length].astype(self.config.dtype)
        x_BxLxD = self.encoder(x_BxLxD, MaskSpec(causal=True) if self.config.causal else None)
        if self.config.pool == "eos":  # rows without EOS pool their last token, as argmax of all-False gives 0
            eos_B = jnp.argmax(tokens_BxL == self.config.eos_id, axis=1)
            return jnp.take_along_axis(x_BxLxD, eos_B[:, None, None], axis=1)[:, 0]
        if self.config.pool == "last":
            return x_BxLxD[:, -1]
        if self.config.pool == "first":
            return x_BxLxD[:, 0]
        return x_BxLxD.mean(axis=1)
