"""Image captioning with a ViT encoder and a text decoder, with CapPa's parallel prediction.

Each example is trained autoregressively (teacher forcing from BOS, causal) or, with probability
`model.caption.masked_pred_prob`, by parallel prediction: the decoder sees only [MASK] tokens with full
attention and predicts every caption token at once (Tschannen et al. 2023, "Image Captioners Are Scalable
Vision Learners Too").

Shape key: B batch, L tokens, N image tokens, E image width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from vlm_jax.flops import captioner_train_flops_per_sample
from vlm_jax.models.captioner import Captioner
from vlm_jax.tasks.caption_loss import (BOS_ID, EOS_ID, caption_loss, caption_loss_weight, sequence_nll,
                                        teacher_forcing)
from vlm_jax.tasks.towers import decoder_config, image_text_batch, vit_config


class CaptionPredictions:
    """The predict functions of a model that captions images (Captioner, CoCa): what the captioning, perplexity
    and scoring-classifier evaluators and `vlm_jax.generate` call. The model supplies `encode_image` (the tokens
    the decoder attends to), `decode_logits`, `init_cache` and `extend`."""

    predictions = ("score", "decode")
    bos_id, eos_id = BOS_ID, EOS_ID
    decode_limit = "the decoder's position table holds model.text.max_len tokens (BOS and all but the last new one)"

    @staticmethod
    def encode_context(model, image_BxHxWx3: jax.Array) -> jax.Array:
        """What the text is conditioned on: the image tokens, [B, N, E]."""
        return model.encode_image(image_BxHxWx3)

    @staticmethod
    def score_text(model, context_BxNxE: jax.Array, text_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(summed NLL [B], token count [B]) of each caption (ids, EOS, pad) given its image tokens."""
        inputs, targets, mask = teacher_forcing(text_BxL)
        return sequence_nll(model.decode_logits(context_BxNxE, inputs), targets, mask)

    def prefill(self, model, image_BxHxWx3: jax.Array, cache_len: int) -> tuple[jax.Array, dict]:
        """(logits [B, V] of the first caption token, cache) after BOS."""
        cache = model.init_cache(self.encode_context(model, image_BxHxWx3), cache_len)
        bos_Bx1 = jnp.full((image_BxHxWx3.shape[0], 1), BOS_ID, jnp.int32)
        logits, cache = model.extend(bos_Bx1, cache)
        return logits[:, 0], cache

    @staticmethod
    def extend(model, cache: dict, tokens_B: jax.Array) -> tuple[jax.Array, dict]:
        logits, cache = model.extend(tokens_B[:, None], cache)
        return logits[:, 0], cache

    def forward(self, model, image_BxHxWx3: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
        """No-cache logits [B, T, V] of a token prefix that starts with BOS (the recomputation reference)."""
        return model.decode_logits(self.encode_context(model, image_BxHxWx3), tokens_BxT)

    def max_decode_len(self) -> int:
        """New tokens a decode may produce: BOS and every token but the last take a position."""
        return self.config.model.text.max_len


class CaptioningTask(CaptionPredictions):
    """Builds a Captioner from `config.model` and scores batches {"image", "text"}."""

    batch_keys = ("image", "text")
    default_evals = ("perplexity", "captioning", "scoring_classifier")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh
        masked, start = config.model.caption.masked_pred_prob, config.model.caption.masked_pred_start_step
        if not 0 <= masked <= 1:
            raise ValueError(f"model.caption.masked_pred_prob must be in [0, 1], got {masked}")
        if start < 0 or (start > 0 and masked == 0):
            raise ValueError(f"model.caption.masked_pred_start_step must be 0, or positive with masked_pred_prob > 0; "
                             f"got {start} with masked_pred_prob {masked}")

    def abstract_batch(self, batch_size: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch as the input pipeline delivers it (uint8 images)."""
        return image_text_batch(self.config, batch_size, sharding)

    def train_flops_per_sample(self) -> int:
        return captioner_train_flops_per_sample(self.config.model)

    def build_model(self, rngs: nnx.Rngs) -> Captioner:
        m = self.config.model
        image = vit_config(m, pool="none")
        return Captioner(image, decoder_config(m, image.encoder_spec().width), rngs, m.image_token_dropout)

    def loss(self, model: Captioner, batch: dict[str, jax.Array], rngs: nnx.Rngs, step: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token cross-entropy; a `masked_pred_prob` share of the rows (drawn from `rngs`) predicts in parallel,
        none before train step `masked_pred_start_step` (`step` None: the share applies); `rngs` also draw the
        patch and image-token dropout, if any."""
        caption = self.config.model.caption
        inputs, targets, mask = teacher_forcing(batch["text"])
        parallel_B = None
        if caption.masked_pred_prob > 0:
            # Drawn at every step, so the dropout draws that follow use the same keys before and after the start.
            parallel_B = jax.random.bernoulli(rngs(), caption.masked_pred_prob, (inputs.shape[0],))
            if caption.masked_pred_start_step > 0 and step is not None:
                parallel_B = parallel_B & (step >= caption.masked_pred_start_step)
        logits = model(batch["image"], inputs, parallel_B, rngs)
        loss, metrics = caption_loss(logits, targets, mask, caption.loss_reduction, caption.label_smoothing)
        if parallel_B is not None:
            metrics["parallel_fraction"] = jnp.mean(parallel_B.astype(jnp.float32))
        return loss, metrics

    def loss_weight(self, micro_batch: dict[str, jax.Array]) -> jax.Array:
        """A micro-batch's share of the loss: its rows (per-example mean) or its supervised tokens."""
        return caption_loss_weight(micro_batch["text"], self.config.model.caption.loss_reduction)
