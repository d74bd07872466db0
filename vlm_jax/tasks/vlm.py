"""Decoder-only VLM training (PaliGemma / LLaVA / SimVLM): one prefix-LM objective over rows of image and text
positions, several examples per row when packed.

Each example is [image tokens][BOS prefix separator][suffix EOS]; the image and prefix part is bidirectional, the
suffix causal, and the loss falls on the suffix only: per example the mean over its suffix tokens, then the mean
over the batch's examples. The host builds the rows (data_pipelines/packing.py) with a weight per position
(1 / the example's supervised tokens), so that mean is sum(weights * nll) / sum(weights) for packed and unpacked
rows alike.

Shape key: B rows, S positions, V vocabulary, I images per row, P prompt tokens, T new tokens, N image tokens.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from data_pipelines.ops import PrefixLmText
from data_pipelines.samples import DataError
from data_pipelines.vlm_examples import VlmOptions, template_fields, vlm_options
from vlm_jax.flops import vlm_train_flops_per_sample
from vlm_jax.models.vit import parse_variant
from vlm_jax.models.vlm import VisionLanguageModel, sequence_mask
from vlm_jax.tasks.caption_loss import BOS_ID, EOS_ID, PAD_ID, token_nll
from vlm_jax.tasks.prior import check_prior_config, prior_weights, reference_model_config
from vlm_jax.tasks.towers import gemma_config, vit_config

ROW_KEYS = ("images", "tokens", "image_slot", "segment_ids", "positions", "prefix_end", "targets",
            "loss_weights")


def data_options(config: ml_collections.ConfigDict) -> VlmOptions:
    """`config.data.vlm` (with the mixture's text-only sources) checked by the input pipeline's own rules."""
    from vlm_jax.config import ConfigError
    if config.data.vlm is None:
        raise ConfigError("task 'vlm' needs config.data.vlm (image_tokens, text_len, tasks; see vlm_jax/config.py)")
    try:
        return vlm_options(config.data.vlm, config.data.mixture)
    except DataError as e:
        raise ConfigError(str(e)) from None


def row_shapes(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(images per row, positions per row) of the configured rows: one example per row, or packed."""
    options = data_options(config)
    return options.images_per_row, options.row_length


def weighted_token_loss(logits_BxSxV: jax.Array, targets_BxS: jax.Array, weights_BxS: jax.Array
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum(weights * nll) / sum(weights), metrics): with weights 1 / (an example's supervised tokens) on its
    supervised positions, the per-example mean then the batch mean."""
    nll_BxS = token_nll(logits_BxSxV, targets_BxS)
    examples = jnp.sum(weights_BxS)
    loss = jnp.sum(weights_BxS * nll_BxS) / jnp.maximum(examples, 1e-9)
    supervised_BxS = (weights_BxS > 0).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(supervised_BxS), 1)
    correct = (jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS) * supervised_BxS
    return loss, {"token_nll": jnp.sum(nll_BxS * supervised_BxS) / tokens,
                  "token_accuracy": jnp.sum(correct) / tokens, "examples": examples}


class VlmTask:
    """Builds a VisionLanguageModel from `config.model` and scores row batches (ROW_KEYS)."""

    batch_keys = ROW_KEYS
    predictions = ("decode",)
    default_evals = ("captioning",)
    bos_id, eos_id = BOS_ID, EOS_ID
    takes_prompt = True  # decoders feed a prompt after the image (evaluators/predict.py)
    decode_limit = "an answer holds at most data.vlm.text_len tokens, as in training"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh
        check_vlm_config(config)

    def abstract_batch(self, batch_size: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global row batch as the input pipeline delivers it (uint8 images)."""
        images, length = row_shapes(self.config)
        size = self.config.model.image.image_size
        shapes = {"images": ((batch_size, images, size, size, 3), jnp.uint8),
                  "loss_weights": ((batch_size, length), jnp.float32)}
        return {key: jax.ShapeDtypeStruct(*shapes.get(key, ((batch_size, length), jnp.int32)), sharding=sharding)
                for key in ROW_KEYS}

    def train_flops_per_sample(self) -> int:
        """Per row; a frozen image tower (optim.freeze matching "image_encoder/") runs forward only."""
        images, length = row_shapes(self.config)
        freeze = self.config.optim.freeze
        frozen = bool(freeze) and re.search(freeze, "image_encoder/") is not None
        return vlm_train_flops_per_sample(self.config.model, images, length, image_frozen=frozen)

    def build_model(self, rngs: nnx.Rngs) -> VisionLanguageModel:
        m = self.config.model
        prior = None if m.vlm.prior_reference is None else gemma_config(reference_model_config(m.vlm.prior_reference))
        return VisionLanguageModel(vit_config(m, pool="none"), gemma_config(m), m.vlm.projector, rngs, prior,
                                   m.image_token_dropout)

    def loss(self, model: VisionLanguageModel, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None,
             step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Suffix-only token cross-entropy, per example then per batch (see the module docstring); with PRIOR,
        each example's tokens weighted by the reference LM (tasks/prior.py). `rngs` (the step's randomness) draw
        the image-token dropout, if any; without them the loss is deterministic. `step` is unused: the objective
        is fixed."""
        weights = batch["loss_weights"]
        if model.prior_lm is not None:
            weights = prior_weights(model.reference_logits(batch), batch["targets"], weights, batch["segment_ids"],
                                    self.config.model.vlm.prior_alpha)
        return weighted_token_loss(model(batch, rngs), batch["targets"], weights)

    def loss_weight(self, micro_batch: dict[str, jax.Array]) -> jax.Array:
        """A micro-batch's share of the loss when accumulating: its examples."""
        return jnp.sum(micro_batch["loss_weights"])

    # ------------------------------------------------------------------------------------------ decoding

    def max_decode_len(self) -> int:
        """New tokens a decode may produce: an example's text length."""
        return data_options(self.config).text_len

    def prompt_ids(self, prompt: str | None = None) -> np.ndarray:
        """int32 ids of [BOS] prompt [separator], as the input pipeline builds prefixes; None: the captioning
        prompt (the constant prefix of the first data.vlm task whose suffix is the caption)."""
        options = data_options(self.config)
        if prompt is None:
            prompt = next((t.prefix for t in options.tasks.values() if t.suffix == "{caption}"
                           and not template_fields(t.prefix)), None)
            if prompt is None:
                raise ValueError("no data.vlm task has a constant prefix and the suffix '{caption}': give the "
                                 "evaluator or vlm_jax.generate a prompt")
        head, separator = PrefixLmText(self.config.data.tokenizer, options.separator, options.lower).prefix(prompt)
        return np.asarray(head + separator, np.int32)

    def prompt_context(self, model: VisionLanguageModel, inputs: dict[str, jax.Array]
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(LM inputs [B, N + P, D], validity [B, N + P], positions [B, N + P]) of each row's image and its
        right-aligned prompt. A prompt's left padding is moved in front of the image ([pad][image][prompt]), so
        every row's real tokens are contiguous and end at the same index: cache slots then differ exactly as
        positions do, which sliding-window layers rely on."""
        image_tokens = model.encode_images(inputs["image"][:, None])
        prompt_BxP = inputs["prompt"]
        x = jnp.concatenate([image_tokens.astype(model.lm.dtype), model.lm.embed(prompt_BxP)], axis=1)
        valid = jnp.concatenate([jnp.ones(image_tokens.shape[:2], bool), prompt_BxP != PAD_ID], axis=1)
        order = jnp.argsort(valid, axis=1, stable=True)  # padding first, real tokens in their order
        x = jnp.take_along_axis(x, order[..., None], axis=1)
        valid = jnp.take_along_axis(valid, order, axis=1)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        return x, valid, positions

    def prefill(self, model: VisionLanguageModel, inputs: dict[str, jax.Array], cache_len: int
                ) -> tuple[jax.Array, dict]:
        """(logits [B, V] of the first answer token, cache) after the image and the prompt, attended to
        bidirectionally; the cache holds `cache_len` more positions for the answer."""
        x, valid, positions = self.prompt_context(model, inputs)
        cache = model.lm.init_cache(x.shape[0], x.shape[1] + cache_len)
        hidden, cache = model.lm.extend(x, positions, cache, bidirectional=True, valid_BxT=valid)
        logits = model.lm.logits(hidden[:, -1:])[:, 0]
        return logits, {"lm": cache, "next_position": positions[:, -1] + 1}

    @staticmethod
    def extend(model: VisionLanguageModel, cache: dict, tokens_B: jax.Array) -> tuple[jax.Array, dict]:
        positions = cache["next_position"][:, None]
        hidden, lm_cache = model.lm.extend(model.lm.embed(tokens_B[:, None]), positions, cache["lm"])
        return model.lm.logits(hidden)[:, 0], {"lm": lm_cache, "next_position": cache["next_position"] + 1}

    def forward(self, model: VisionLanguageModel, inputs: dict[str, jax.Array], tokens_BxT: jax.Array
                ) -> jax.Array:
        """No-cache logits [B, T, V]: position t predicts answer token t + 1 after the image and the prompt.
        tokens_BxT[:, 0] stands for the prompt's last token (decoding's BOS convention) and is not read."""
        x, valid, positions = self.prompt_context(model, inputs)
        answer = tokens_BxT[:, 1:]
        x = jnp.concatenate([x, model.lm.embed(answer)], axis=1)
        context = valid.shape[1]
        answer_positions = positions[:, -1:] + 1 + jnp.arange(answer.shape[1])[None]
        positions = jnp.concatenate([positions, answer_positions.astype(jnp.int32)], axis=1)
        segments = jnp.concatenate([valid, jnp.ones(answer.shape, bool)], axis=1).astype(jnp.int32)
        mask = sequence_mask(segments, jnp.full(segments.shape, context, jnp.int32))
        hidden = model.lm(x, positions, mask)
        return model.lm.logits(hidden[:, context - 1:])


def check_vlm_config(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a VLM config whose data rows and model disagree."""
    from vlm_jax.config import ConfigError
    options, m = data_options(config), config.model
    image = vit_config(m, pool="none")
    grid = image.image_size // parse_variant(image.variant)[1]
    if options.image_tokens != grid * grid:
        raise ConfigError(f"data.vlm.image_tokens is {options.image_tokens} but the image encoder ({image.variant} "
                          f"at {image.image_size} px) gives {grid * grid} tokens per image")
    if m.image.patch_dropout > 0:
        raise ConfigError("config key 'model.image.patch_dropout' must be 0 for task 'vlm': each image position of "
                          "the rows names one of the encoder's tokens; use model.image_token_dropout")
    if options.row_length > m.lm.max_len:
        raise ConfigError(f"rows of {options.row_length} positions (image tokens and text) exceed model.lm.max_len "
                          f"{m.lm.max_len}, the longest sequence this model is configured for")
    if m.vlm.prior_reference is not None:
        check_prior_config(config)
