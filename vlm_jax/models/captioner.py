"""Encoder-decoder captioner (captioning, CapPa): a ViT's patch tokens, unpooled, feed a text decoder.

Shape key: B batch, H/W image height/width, L tokens, N image tokens, E image width, V vocabulary, S cache length.
"""

from __future__ import annotations

import jax
from flax import nnx

from vlm_jax.models.decoder import Cache, DecoderConfig, TextDecoder
from vlm_jax.models.vit import ViT, ViTConfig


class Captioner(nnx.Module):
    """ViT (pool "none") -> TextDecoder cross-attending to every patch token."""

    def __init__(self, image: ViTConfig, decoder: DecoderConfig, rngs: nnx.Rngs):
        if image.pool != "none":
            raise ValueError(f"a captioner's image encoder passes every token on: model.image.pool must be 'none', "
                             f"not {image.pool!r}")
        self.image_encoder = ViT(image, rngs)
        self.text_decoder = TextDecoder(decoder, rngs)

    def encode_image(self, image_BxHxWx3: jax.Array) -> jax.Array:
        """The image tokens the decoder attends to, [B, N, E]."""
        return self.image_encoder(image_BxHxWx3)

    def __call__(self, image_BxHxWx3: jax.Array, tokens_BxL: jax.Array, parallel_B: jax.Array | None = None
                 ) -> jax.Array:
        """Teacher-forced float32 logits [B, L, V]."""
        return self.text_decoder(tokens_BxL, self.encode_image(image_BxHxWx3), parallel_B)

    def decode_logits(self, image_BxNxE: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
        """Causal logits [B, L, V] of a token prefix given encoded image tokens (scoring, no-cache decoding)."""
        return self.text_decoder(tokens_BxL, image_BxNxE)

    def init_cache(self, image_BxNxE: jax.Array, cache_len: int) -> Cache:
        return self.text_decoder.init_cache(image_BxNxE, cache_len)

    def extend(self, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        return self.text_decoder.extend(tokens_BxT, cache)
