"""Encoder-decoder captioner (captioning, CapPa): a ViT's patch tokens, unpooled, feed a text decoder.

Shape key: B batch, H/W image height/width, L tokens, N image tokens, E image width, V vocabulary, S cache length.
"""

from __future__ import annotations

import jax
from flax import nnx

from vlm_jax.models.decoder import Cache, DecoderConfig, TextDecoder
from vlm_jax.models.token_dropout import check_rate, drop_tokens
from vlm_jax.models.vit import ViT, ViTConfig


class Captioner(nnx.Module):
    """ViT (pool "none") -> TextDecoder cross-attending to every patch token (in training, with
    `image_token_dropout` > 0, to a random share of them per example)."""

    def __init__(self, image: ViTConfig, decoder: DecoderConfig, rngs: nnx.Rngs, image_token_dropout: float = 0.0):
        if image.pool != "none":
            raise ValueError(f"a captioner's image encoder passes every token on: model.image.pool must be 'none', "
                             f"not {image.pool!r}")
        check_rate(image_token_dropout, "model.image_token_dropout")
        self.image_encoder = ViT(image, rngs)
        self.text_decoder = TextDecoder(decoder, rngs)
        self.image_token_dropout = image_token_dropout

    def encode_image(self, image_BxHxWx3: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The image tokens the decoder attends to, [B, N, E]; with `rngs` (training only) the ViT's patch dropout
        and then `image_token_dropout` each keep a random share of them, [B, K, E]."""
        tokens_BxNxE = self.image_encoder(image_BxHxWx3, rngs)
        if rngs is None or self.image_token_dropout == 0:
            return tokens_BxNxE
        return drop_tokens(tokens_BxNxE, rngs.dropout(), self.image_token_dropout)

    def __call__(self, image_BxHxWx3: jax.Array, tokens_BxL: jax.Array, parallel_B: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Teacher-forced float32 logits [B, L, V]; `rngs`: training (token dropout, if configured)."""
        return self.text_decoder(tokens_BxL, self.encode_image(image_BxHxWx3, rngs), parallel_B)

    def decode_logits(self, image_BxNxE: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
        """Causal logits [B, L, V] of a token prefix given encoded image tokens (scoring, no-cache decoding)."""
        return self.text_decoder(tokens_BxL, image_BxNxE)

    def init_cache(self, image_BxNxE: jax.Array, cache_len: int) -> Cache:
        return self.text_decoder.init_cache(image_BxNxE, cache_len)

    def extend(self, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        return self.text_decoder.extend(tokens_BxT, cache)
