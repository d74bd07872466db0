"""Tower configs from `config.model`, shared by every task that builds a ViT, a text encoder or a decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.decoder import DecoderConfig
from vlm_jax.models.gemma import GemmaConfig
from vlm_jax.models.text import TextConfig
from vlm_jax.models.vit import ViTConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SIZE_OVERRIDES = ("width", "depth", "mlp_dim", "num_heads")
# model.arch -> (the towers' shared options, the ViT's, the text tower's)
ARCHITECTURES = {
    "big_vision": ({}, {}, {}),
    "clip": ({"act": "quick_gelu", "norm_eps": 1e-5}, {"pre_norm": True, "patch_bias": False, "cls_token": True}, {"causal": True}),
}
GEMMA_OVERRIDES = ("num_kv_heads", "head_dim", "window", "attn_softcap", "final_softcap", "rope_base",
                   "rope_base_local", "qk_norm", "post_norms", "layer_pattern")


def _shared(m: ml_collections.ConfigDict, tower: ml_collections.ConfigDict) -> dict:
    return dict(dtype=DTYPES[m.dtype], scan=m.scan, attention_impl=m.attention_impl, remat=tower.remat,
                **{key: tower[key] for key in SIZE_OVERRIDES})


def vit_config(m: ml_collections.ConfigDict, pool: str | None = None) -> ViTConfig:
    """model.image as a ViTConfig in model.arch's conventions; `pool` overrides model.image.pool (decoders take
    every token)."""
    shared, image, _ = ARCHITECTURES[m.arch]
    return ViTConfig(variant=m.image.variant, image_size=m.image.image_size, pool=pool or m.image.pool,
                     posemb=m.image.posemb, patch_dropout=m.image.patch_dropout, **image, **shared,
                     **_shared(m, m.image))


def text_config(m: ml_collections.ConfigDict) -> TextConfig:
    """model.text as a TextConfig in model.arch's conventions."""
    shared, _, text = ARCHITECTURES[m.arch]
    return TextConfig(size=m.text.size, vocab_size=m.text.vocab_size, max_len=m.text.max_len, pool=m.text.pool,
                      eos_id=m.text.eos_id, **text, **shared, **_shared(m, m.text))


def decoder_config(m: ml_collections.ConfigDict, image_width: int) -> DecoderConfig:
    """model.decoder with model.text's vocabulary and length, attending to tokens of `image_width`."""
    return DecoderConfig(size=m.decoder.size, vocab_size=m.text.vocab_size, max_len=m.text.max_len,
                         image_width=image_width, zero_init_head=m.decoder.zero_init_head,
                         **_shared(m, m.decoder))


def gemma_config(m: ml_collections.ConfigDict) -> GemmaConfig:
    """model.lm as a GemmaConfig with model.text's vocabulary."""
    overrides = {key: m.lm[key] for key in GEMMA_OVERRIDES}
    return GemmaConfig(size=m.lm.size, vocab_size=m.text.vocab_size, **overrides, **_shared(m, m.lm))


def image_text_batch(config: ml_collections.ConfigDict, batch_size: int, sharding=None
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global {"image", "text"} batch as the input pipeline delivers it (uint8 images)."""
    image, length = config.model.image.image_size, config.model.text.max_len
    return {"image": jax.ShapeDtypeStruct((batch_size, image, image, 3), jnp.uint8, sharding=sharding),
            "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)}
