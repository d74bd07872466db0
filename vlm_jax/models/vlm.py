"""Decoder-only vision-language model (PaliGemma / LLaVA / SimVLM family): ViT patch tokens, projected to the LM's
width, take their places in the LM's input sequence; the LM is a Gemma-architecture decoder (models/gemma.py).

The input is a row of positions built on the host (data_pipelines/packing.py): text ids, image slots (which
image token sits at a position), segment ids (packed examples; 0 is padding), positions restarting per example
(RoPE) and each position's prefix end (its example's image + prefix + separator part is bidirectional, the rest
causal). The attention mask is a `MaskSpec` the kernels evaluate per block: causal, with each query's prefix end
and segment ids.

Shape key: B rows, I images per row, H/W image height/width, N image tokens per image, E image width,
S sequence positions, D LM width, V vocabulary, P prompt tokens, T new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.models.gemma import GemmaConfig, GemmaLM
from vlm_jax.models.layers import dense
from vlm_jax.models.token_dropout import check_rate, kept_count, kept_mask
from vlm_jax.models.vit import ViT, ViTConfig
from vlm_jax.parallel.sharding import constrain

PROJECTORS = ("linear", "mlp")  # PaliGemma: one linear layer; LLaVA-1.5: Linear -> GELU -> Linear


def sequence_mask(segment_ids_BxS: jax.Array, prefix_end_BxS: jax.Array) -> MaskSpec:
    """Prefix-LM attention over packed rows: a query sees the keys of its own example (segment) that come before
    it or lie in the example's bidirectional part (image + prefix + separator); padding (segment 0) sees nothing
    and is seen by nothing."""
    return MaskSpec(causal=True, q_segment_ids_BxT=segment_ids_BxS, kv_segment_ids_BxS=segment_ids_BxS,
                    q_prefix_end_BxT=prefix_end_BxS)


def drop_image_positions(segment_ids_BxS: jax.Array, image_slot_BxS: jax.Array, images: int, tokens_per_image: int,
                         rate: float, key: jax.Array) -> jax.Array:
    """Image-token dropout on rows: each of a row's `images` images keeps a random kept_count(N, rate) of its N
    tokens; the positions of the others become padding (segment 0: they attend to nothing and nothing attends to
    them). Rows keep their length and every kept position its RoPE position."""
    rows, slots = segment_ids_BxS.shape[0], images * tokens_per_image
    keep = kept_count(tokens_per_image, rate)
    kept_BxM = kept_mask(key, rows * images, tokens_per_image, keep).reshape(rows, slots)
    kept_BxS = jnp.take_along_axis(kept_BxM, jnp.clip(image_slot_BxS, 0, slots - 1), axis=1)
    return jnp.where((image_slot_BxS >= 0) & ~kept_BxS, 0, segment_ids_BxS)


class Projector(nnx.Module):
    """Image tokens [.., E] -> LM inputs [.., D]: linear, or LLaVA's two layers with a GELU between."""

    def __init__(self, kind: str, image_width: int, lm_width: int, dtype, rngs: nnx.Rngs):
        if kind not in PROJECTORS:
            raise ValueError(f"unknown model.vlm.projector {kind!r}; choose from {PROJECTORS}")
        self.fc1 = dense(image_width, lm_width, ("embed", "mlp"), dtype, rngs)
        self.fc2 = dense(lm_width, lm_width, ("mlp", "embed"), dtype, rngs) if kind == "mlp" else None

    def __call__(self, x_BxNxE: jax.Array) -> jax.Array:
        y_BxNxD = self.fc1(x_BxNxE)
        return y_BxNxD if self.fc2 is None else self.fc2(nnx.gelu(y_BxNxD, approximate=False))


class VisionLanguageModel(nnx.Module):
    """ViT (pool "none") -> projector -> Gemma LM over rows of image and text positions."""

    def __init__(self, image: ViTConfig, lm: GemmaConfig, projector: str, rngs: nnx.Rngs,
                 prior_lm: GemmaConfig | None = None, image_token_dropout: float = 0.0):
        """`prior_lm`: a frozen text-only reference LM for PRIOR token weighting (tasks/prior.py).
        `image_token_dropout`: in training, the share of each image's tokens the LM does not see."""
        if image.pool != "none":
            raise ValueError(f"a VLM's image encoder passes every token on: model.image.pool must be 'none', "
                             f"not {image.pool!r}")
        check_rate(image_token_dropout, "model.image_token_dropout")
        self.image_token_dropout = image_token_dropout
        self.image_encoder = ViT(image, rngs)
        self.lm = GemmaLM(lm, rngs)
        self.projector = Projector(projector, image.encoder_spec().width, self.lm.width, lm.dtype, rngs)
        self.num_image_tokens = self.image_encoder.grid ** 2
        self.prior_lm = None if prior_lm is None else GemmaLM(prior_lm, rngs)

    def encode_images(self, images_BxIxHxWx3: jax.Array) -> jax.Array:
        """Every image's tokens in the LM's width, flattened per row: [B, I * N, D]."""
        rows, per_row = images_BxIxHxWx3.shape[:2]
        tokens = self.image_encoder(images_BxIxHxWx3.reshape(rows * per_row, *images_BxIxHxWx3.shape[2:]))
        return self.projector(tokens).reshape(rows, per_row * tokens.shape[1], -1)

    def embed(self, tokens_BxS: jax.Array, image_slot_BxS: jax.Array, image_tokens_BxMxD: jax.Array) -> jax.Array:
        """LM inputs: the image token named by each position's slot, else the (scaled) text embedding."""
        text_BxSxD = self.lm.embed(tokens_BxS)
        slot_BxS = jnp.clip(image_slot_BxS, 0, image_tokens_BxMxD.shape[1] - 1)
        image_BxSxD = jnp.take_along_axis(image_tokens_BxMxD, slot_BxS[..., None], axis=1)
        x_BxSxD = jnp.where((image_slot_BxS >= 0)[..., None], image_BxSxD.astype(text_BxSxD.dtype), text_BxSxD)
        return constrain(x_BxSxD, ("activation_batch", "activation_length", "activation_embed"))

    def __call__(self, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None) -> jax.Array:
        """float32 logits [B, S, V] of every position of a row batch (the format of data_pipelines/packing.py).
        With `rngs` (training only) and `image_token_dropout` > 0, the LM sees a random share of each image's
        tokens (`drop_image_positions`)."""
        segment_ids_BxS = batch["segment_ids"]
        if rngs is not None and self.image_token_dropout > 0:
            segment_ids_BxS = drop_image_positions(segment_ids_BxS, batch["image_slot"], batch["images"].shape[1],
                                                   self.num_image_tokens, self.image_token_dropout, rngs.dropout())
        x_BxSxD = self.embed(batch["tokens"], batch["image_slot"], self.encode_images(batch["images"]))
        hidden = self.lm(x_BxSxD, batch["positions"], sequence_mask(segment_ids_BxS, batch["prefix_end"]))
        return self.lm.logits(hidden)

    def reference_logits(self, batch: dict[str, jax.Array]) -> jax.Array:
        """float32 logits [B, S, V] of the text-only reference LM on the rows' text: image positions are left
        out (segment 0), the text keeps its positions (RoPE sees only their differences)."""
        text_segments_BxS = jnp.where(batch["image_slot"] >= 0, 0, batch["segment_ids"])
        x_BxSxD = self.prior_lm.embed(batch["tokens"])
        hidden = self.prior_lm(x_BxSxD, batch["positions"], sequence_mask(text_segments_BxS, batch["prefix_end"]))
        return self.prior_lm.logits(hidden)
