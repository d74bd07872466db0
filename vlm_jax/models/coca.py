"""CoCa: Contrastive Captioners (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

One image encoder and one text decoder trained with a contrastive and a captioning loss at once:
- image: a ViT keeps every patch token; two attentional poolers read them: one query -> LayerNorm -> projection ->
  L2-normalised contrastive embedding; `caption_queries` queries -> the tokens the multimodal layers attend to.
- unimodal text layers (model.text's size): causal self-attention only, over the teacher-forcing input
  [BOS, caption ids] with a learned CLS token right after the last real token; the CLS output (final LayerNorm,
  projection, L2-normalise) is the text embedding.
- multimodal text layers (model.decoder's size): the unimodal token outputs (without CLS) through DecoderBlocks
  (causal self-attention, cross-attention to the caption queries, MLP), LayerNorm and an untied head -> logits.

The CLS sits at position n (n = real input tokens; a caption ids + EOS of n tokens has inputs [BOS, ids], so the
CLS takes the slot of EOS's input, and one extra slot serves a caption that fills the length). The mask is then
plain causal: the CLS sees the n real tokens and itself and no padding (the padding trails it), and every real
token sees exactly what it sees without a CLS, so the training logits equal `decode_logits` and the KV-cached
`extend`. The CLS has no position embedding, so the text embedding does not depend on the padded length.

Text for `embed_text` and `__call__` is the pipeline's (ids, EOS, then padding, which trails): the model shifts it
right with BOS itself (`text_inputs`, equal to tasks/caption_loss.teacher_forcing), so zero-shot prompts and
retrieval captions are embedded exactly as training embeds captions.

Parameter names: the image side is `image_encoder` (ViT), `image_contrastive_pool`, `image_caption_pool`,
`image_proj`, so `optim.freeze = "^image_"` locks it (LiT); the text side is `text_encoder` (unimodal),
`text_proj`, `text_decoder` (multimodal layers and head); `logit_scale` (and `logit_bias` for sigmoid).

Shape key: B batch, H/W image height/width, N image tokens, Q caption queries, D width, E joint embedding width,
L tokens, T new tokens, S cache length, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.decoder import (Cache, DecoderBlock, DecoderConfig, cached_self_attention, empty_self_cache,
                                    extend_stack, stacked_image_kv)
from vlm_jax.models.layers import (Encoder, EncoderBlock, EncoderSpec, MultiHeadAttention, dense, layer_norm,
                                   partitioned)
from vlm_jax.models.text import TextConfig
from vlm_jax.models.two_towers import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, l2_normalize
from vlm_jax.models.vit import ViT, ViTConfig

CAUSAL = MaskSpec(causal=True)


@dataclasses.dataclass(frozen=True)
class CocaConfig:
    """The three towers, the joint embedding, the contrastive loss (for the logit bias), the decoder's queries
    and the token ids of teacher forcing (the tokenizer's)."""

    image: ViTConfig      # pool "none": the poolers read every token
    text: TextConfig      # unimodal layers; its vocabulary and max_len are the decoder's too
    decoder: DecoderConfig  # multimodal layers; width must equal the unimodal width
    embed_dim: int
    loss: str = "sigmoid"
    caption_queries: int = 256
    bos_id: int = 3
    pad_id: int = 0

    def __post_init__(self):
        text_width, decoder_width = self.text.encoder_spec().width, self.decoder.encoder_spec().width
        problems = [
            (self.image.pool != "none", f"model.image.pool must be 'none' (the poolers read every token), not "
                                        f"{self.image.pool!r}"),
            (self.loss not in INIT_LOGIT_SCALE, f"unknown contrastive loss {self.loss!r}; choose from "
                                                f"{tuple(INIT_LOGIT_SCALE)}"),
            (self.caption_queries < 1, f"model.coca.caption_queries must be >= 1, got {self.caption_queries}"),
            (text_width != decoder_width, f"the multimodal layers continue the unimodal text stream: "
                                          f"model.decoder width {decoder_width} must equal model.text width "
                                          f"{text_width}"),
            (self.decoder.vocab_size != self.text.vocab_size, "decoder and text vocabularies differ"),
            (self.decoder.image_width != self.image.encoder_spec().width,
             "decoder.image_width must be the image width"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(f"CoCa: {message}")


def text_inputs(text_BxL: jax.Array, bos_id: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """(teacher-forcing input [B, L], real input tokens n [B]) of pipeline text (ids, EOS, trailing padding):
    BOS then the text shifted right, padding kept; n = the text's non-pad tokens."""
    real_BxL = text_BxL != pad_id
    shifted_BxL = jnp.concatenate([jnp.full_like(text_BxL[:, :1], bos_id), text_BxL[:, :-1]], axis=1)
    return jnp.where(real_BxL, shifted_BxL, pad_id), jnp.sum(real_BxL, axis=1).astype(jnp.int32)


class AttentionPooler(nnx.Module):
    """`num_queries` learned queries attend over the tokens (one multi-head attention), then LayerNorm."""

    def __init__(self, spec: EncoderSpec, num_queries: int, rngs: nnx.Rngs):
        self.probe = nnx.Param(partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (num_queries, spec.width), jnp.float32))
        self.attn = MultiHeadAttention(spec.width, spec.num_heads, spec.dtype, rngs, spec.attention_impl)
        self.ln = layer_norm(spec.width, spec.dtype, rngs, spec.norm_eps)
        self.dtype = spec.dtype

    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        """[B, Q, D]."""
        probe_BxQxD = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x_BxNxD.shape[0], *self.probe.shape))
        return self.ln(self.attn(probe_BxQxD, x_BxNxD))


class UnimodalBlock(EncoderBlock):
    """A pre-LN encoder block (causal self-attention, MLP) that can also run on new tokens with a KV cache."""

    def extend(self, x_BxTxD: jax.Array, layer_cache: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
        y_BxTxD, layer_cache = cached_self_attention(self.attn, self.ln1(x_BxTxD), layer_cache, position)
        x_BxTxD = x_BxTxD + y_BxTxD
        return x_BxTxD + self.mlp(self.ln2(x_BxTxD)), layer_cache


class UnimodalText(nnx.Module):
    """Token + learned position embeddings and a causal encoder stack (final LayerNorm included), with an
    optional learned CLS token placed after each sequence's real tokens."""

    def __init__(self, config: TextConfig, rngs: nnx.Rngs):
        spec = config.encoder_spec()
        self.config, self.spec = config, spec
        self.token_embed = nnx.Embed(
            config.vocab_size, spec.width, dtype=config.dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.posemb = nnx.Param(partitioned(nnx.initializers.normal(0.01), (None, "embed"))(
            rngs.params(), (config.max_len, spec.width), jnp.float32))
        self.cls_token = nnx.Param(partitioned(nnx.initializers.normal(0.02), ("embed",))(
            rngs.params(), (spec.width,), jnp.float32))
        self.encoder = Encoder(spec, rngs, make_block=UnimodalBlock)

    def check_length(self, length: int) -> None:
        if length > self.config.max_len:
            raise ValueError(f"text length {length} exceeds the position table of {self.config.max_len} "
                             f"(model.text.max_len)")

    def embed(self, tokens_BxT: jax.Array, position: jax.Array | int = 0) -> jax.Array:
        """Token + position embeddings of T tokens starting at `position`."""
        posemb_TxD = jax.lax.dynamic_slice_in_dim(self.posemb[...], position, tokens_BxT.shape[1], axis=0)
        return self.token_embed(tokens_BxT) + posemb_TxD.astype(self.config.dtype)

    def __call__(self, tokens_BxL: jax.Array, lengths_B: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """(token outputs [B, L, D], CLS output [B, D] or None). With `lengths_B` (n, 0..L) the CLS goes at
        position n: it sees tokens < n and itself; tokens >= n (padding) reach neither it nor earlier tokens."""
        length = tokens_BxL.shape[1]
        self.check_length(length)
        x_BxLxD = self.embed(tokens_BxL)
        if lengths_B is None:
            return self.encoder(x_BxLxD, CAUSAL), None
        x_BxL1xD = jnp.concatenate([x_BxLxD, jnp.zeros_like(x_BxLxD[:, :1])], axis=1)
        at_cls_BxL1x1 = (jnp.arange(length + 1)[None, :] == lengths_B[:, None])[..., None]
        x_BxL1xD = jnp.where(at_cls_BxL1x1, self.cls_token[...].astype(x_BxL1xD.dtype), x_BxL1xD)
        y_BxL1xD = self.encoder(x_BxL1xD, CAUSAL)
        cls_BxD = jnp.sum(jnp.where(at_cls_BxL1x1, y_BxL1xD, 0), axis=1)  # one position per row: exact
        return y_BxL1xD[:, :length], cls_BxD


class MultimodalText(nnx.Module):
    """DecoderBlocks over the unimodal token outputs (cross-attending to the caption queries), LayerNorm and the
    untied output head -> float32 logits."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        spec = config.encoder_spec()
        self.config, self.spec = config, spec
        self.decoder = Encoder(spec, rngs, make_block=lambda s, r: DecoderBlock(s, config.image_width, r))
        head_init = nnx.initializers.zeros_init() if config.zero_init_head else nnx.initializers.xavier_uniform()
        self.head = dense(spec.width, config.vocab_size, ("embed", "vocab"), config.dtype, rngs, head_init)

    def __call__(self, x_BxLxD: jax.Array, context_BxQxD: jax.Array) -> jax.Array:
        x_BxLxD = self.decoder(x_BxLxD, context_BxQxD.astype(self.config.dtype), CAUSAL)
        return self.head(x_BxLxD).astype(jnp.float32)


class Coca(nnx.Module):
    """ViT -> (contrastive pooler, caption pooler); unimodal text with CLS -> multimodal text -> logits."""

    def __init__(self, config: CocaConfig, rngs: nnx.Rngs):
        self.config = config
        image = config.image.encoder_spec()
        text_width = config.text.encoder_spec().width
        self.image_encoder = ViT(config.image, rngs)
        self.image_contrastive_pool = AttentionPooler(image, 1, rngs)
        self.image_caption_pool = AttentionPooler(image, config.caption_queries, rngs)
        self.image_proj = dense(image.width, config.embed_dim, ("embed", "proj"), image.dtype, rngs)
        self.text_encoder = UnimodalText(config.text, rngs)
        self.text_proj = dense(text_width, config.embed_dim, ("embed", "proj"), config.text.dtype, rngs)
        self.text_decoder = MultimodalText(config.decoder, rngs)
        self.logit_scale = nnx.Param(jnp.asarray(INIT_LOGIT_SCALE[config.loss], jnp.float32))
        if config.loss == "sigmoid":
            self.logit_bias = nnx.Param(jnp.asarray(INIT_LOGIT_BIAS, jnp.float32))

    # -- image side
    def image_outputs(self, image_BxHxWx3: jax.Array, rngs: nnx.Rngs | None = None
                      ) -> tuple[jax.Array, jax.Array]:
        """(L2-normalised float32 image embedding [B, E], caption queries [B, Q, D]) from one ViT pass; `rngs`
        (training only) draw its patch dropout."""
        tokens_BxNxD = self.image_encoder(image_BxHxWx3, rngs)
        return self._image_embedding(tokens_BxNxD), self.image_caption_pool(tokens_BxNxD)

    def _image_embedding(self, tokens_BxNxD: jax.Array) -> jax.Array:
        return l2_normalize(self.image_proj(self.image_contrastive_pool(tokens_BxNxD)[:, 0]))

    def embed_image(self, image_BxHxWx3: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """L2-normalised float32 image embeddings [B, E]; `rngs` (training only) draw the ViT's patch dropout."""
        return self._image_embedding(self.image_encoder(image_BxHxWx3, rngs))

    def encode_image(self, image_BxHxWx3: jax.Array) -> jax.Array:
        """The caption-query tokens the multimodal layers attend to, [B, Q, D]."""
        return self.image_caption_pool(self.image_encoder(image_BxHxWx3))

    # -- text side
    def text_inputs(self, text_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
        return text_inputs(text_BxL, self.config.bos_id, self.config.pad_id)

    def text_outputs(self, inputs_BxL: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(unimodal token outputs [B, L, D], L2-normalised float32 text embedding [B, E]) of teacher-forcing
        inputs with `lengths_B` real tokens each."""
        tokens_BxLxD, cls_BxD = self.text_encoder(inputs_BxL, lengths_B)
        return tokens_BxLxD, l2_normalize(self.text_proj(cls_BxD))

    def embed_text(self, text_BxL: jax.Array) -> jax.Array:
        """L2-normalised float32 text embeddings [B, E] of pipeline text (ids, EOS, padding)."""
        return self.text_outputs(*self.text_inputs(text_BxL))[1]

    def temperature(self) -> tuple[jax.Array, jax.Array | None]:
        """(log logit scale, logit bias or None)."""
        bias = self.logit_bias[...] if hasattr(self, "logit_bias") else None
        return self.logit_scale[...], bias

    # -- both
    def forward(self, image_BxHxWx3: jax.Array, inputs_BxL: jax.Array, lengths_B: jax.Array,
                rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embeddings [B, E], text embeddings [B, E], teacher-forced float32 logits [B, L, V])."""
        zimg_BxE, context_BxQxD = self.image_outputs(image_BxHxWx3, rngs)
        tokens_BxLxD, ztxt_BxE = self.text_outputs(inputs_BxL, lengths_B)
        return zimg_BxE, ztxt_BxE, self.text_decoder(tokens_BxLxD, context_BxQxD)

    def __call__(self, image_BxHxWx3: jax.Array, text_BxL: jax.Array, rngs: nnx.Rngs | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`forward` on pipeline text; logits position i predicts text token i."""
        return self.forward(image_BxHxWx3, *self.text_inputs(text_BxL), rngs)

    # -- decoding (tasks/captioning.py CaptionPredictions)
    def decode_logits(self, context_BxQxD: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
        """Causal float32 logits [B, L, V] of a token prefix (no CLS) given the caption queries."""
        return self.text_decoder(self.text_encoder(tokens_BxL)[0], context_BxQxD)

    def init_cache(self, context_BxQxD: jax.Array, cache_len: int) -> Cache:
        """An empty cache of `cache_len` positions for both stacks: {"unimodal": self k/v, "multimodal": self and
        cross k/v (the caption queries' keys and values, computed once)}, each [B, layers, ...], and the shared
        0-d write "position"."""
        self.text_encoder.check_length(cache_len)
        batch, dtype = context_BxQxD.shape[0], self.config.decoder.dtype
        cross = stacked_image_kv(self.text_decoder.decoder, context_BxQxD.astype(dtype))
        return {"unimodal": empty_self_cache(self.text_encoder.spec, batch, cache_len, self.config.text.dtype),
                "multimodal": {**empty_self_cache(self.text_decoder.spec, batch, cache_len, dtype), **cross},
                "position": jnp.zeros((), jnp.int32)}

    def extend(self, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """float32 logits [B, T, V] of T new tokens written at the cache's position, and the updated cache."""
        position = cache["position"]
        x_BxTxD = self.text_encoder.embed(tokens_BxT, position)
        x_BxTxD, unimodal = extend_stack(self.text_encoder.encoder, x_BxTxD, cache["unimodal"], position)
        x_BxTxD, multimodal = extend_stack(self.text_decoder.decoder, x_BxTxD, cache["multimodal"], position)
        logits = self.text_decoder.head(x_BxTxD).astype(jnp.float32)
        return logits, {"unimodal": unimodal, "multimodal": multimodal,
                        "position": position + tokens_BxT.shape[1]}
