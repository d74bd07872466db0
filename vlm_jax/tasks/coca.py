"""The CoCa objective: contrastive_weight x contrastive loss + caption_weight x captioning loss (Yu et al. 2022).

The contrastive part is ContrastiveTask's (softmax or sigmoid per model.loss; the distributed ring / all-gather
with model.loss_impl = "collective"), on the attentional-pooled image embedding and the unimodal CLS text
embedding. The caption part is the token cross-entropy of the multimodal layers' teacher-forced logits
(model.caption.loss_reduction, label_smoothing); pad tokens carry no loss. CapPa's parallel prediction
(model.caption.masked_pred_prob > 0) is refused: CoCa's multimodal layers continue the causal unimodal stream.

Micro-batching keeps full-batch negatives (vlm_jax/microbatch.py): `embed_pair` gives the cached embeddings,
`embed_pair_and_local_loss` recomputes them together with the micro-batch's caption term, whose share of the
full batch's mean is `local_loss_weight`.

Shape key: B batch, L tokens, E embedding width, V vocabulary.
"""

from __future__ import annotations

import re

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from vlm_jax.flops import coca_train_flops_per_sample
from vlm_jax.models.coca import Coca, CocaConfig
from vlm_jax.tasks.caption_loss import BOS_ID, PAD_ID, caption_loss, caption_loss_weight, teacher_forcing
from vlm_jax.tasks.captioning import CaptionPredictions
from vlm_jax.tasks.contrastive import ContrastiveTask
from vlm_jax.tasks.towers import decoder_config, text_config, vit_config

# What optim.freeze must match for the analytic FLOPs to count the image side forward-only (LiT: "^image_").
IMAGE_SIDE = ("image_encoder/", "image_contrastive_pool/", "image_caption_pool/", "image_proj/")


class CocaTask(CaptionPredictions):
    """Builds a Coca model from `config.model` and scores batches {"image", "text"}."""

    batch_keys = ("image", "text")
    predictions = ("embed", "score", "decode")
    default_evals = ("zeroshot", "retrieval", "perplexity", "captioning")
    microbatching = "cached_embeddings"  # the contrastive term couples the examples

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh
        if config.model.caption.masked_pred_prob > 0:
            raise ValueError("model.caption.masked_pred_prob > 0 (CapPa parallel prediction) is not available for "
                             "task 'coca': its multimodal layers continue the causal unimodal text stream")
        coca = config.model.coca
        if coca.contrastive_weight < 0 or coca.caption_weight < 0:
            raise ValueError(f"model.coca weights must be >= 0, got contrastive {coca.contrastive_weight}, "
                             f"caption {coca.caption_weight}")
        self.contrastive = ContrastiveTask(config, mesh)  # the contrastive loss machinery, ring included

    def abstract_batch(self, batch_size: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch as the input pipeline delivers it (uint8 images)."""
        return self.contrastive.abstract_batch(batch_size, sharding)

    def image_frozen(self) -> bool:
        freeze = self.config.optim.freeze
        return bool(freeze) and all(re.search(freeze, path) for path in IMAGE_SIDE)

    def train_flops_per_sample(self) -> int:
        """Analytic model FLOPs of one training example (forward + backward), the numerator of MFU."""
        return coca_train_flops_per_sample(self.config.model, self.image_frozen())

    def model_config(self) -> CocaConfig:
        m = self.config.model
        image = vit_config(m, pool="none")
        return CocaConfig(image=image, text=text_config(m), decoder=decoder_config(m, image.encoder_spec().width),
                          embed_dim=m.embed_dim, loss=m.loss, caption_queries=m.coca.caption_queries,
                          bos_id=BOS_ID, pad_id=PAD_ID)

    def build_model(self, rngs: nnx.Rngs) -> Coca:
        return Coca(self.model_config(), rngs)

    def loss(self, model: Coca, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None,
             step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for one batch; `rngs` (the step's randomness) draw the image tower's patch
        dropout, if any; without them the loss is deterministic. `step` is unused: the objective is fixed."""
        (zimg_BxE, ztxt_BxE), caption, caption_metrics = self.embed_pair_and_local_loss(model, batch, rngs)
        contrastive, metrics = self.loss_from_embeddings(zimg_BxE, ztxt_BxE, *model.temperature())
        return contrastive + caption, {**metrics, **caption_metrics}

    # The contrastive predictions and what micro-batching caches (no decoder pass): the two-tower model's.
    embed_pair = staticmethod(ContrastiveTask.embed_pair)
    temperature = staticmethod(ContrastiveTask.temperature)
    embed_image = staticmethod(ContrastiveTask.embed_image)
    embed_text = staticmethod(ContrastiveTask.embed_text)

    def loss_from_embeddings(self, zimg_BxE: jax.Array, ztxt_BxE: jax.Array, log_scale: jax.Array,
                             bias: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """contrastive_weight x the batch-coupled contrastive loss (every negative of the batch counts)."""
        contrastive, metrics = self.contrastive.loss_from_embeddings(zimg_BxE, ztxt_BxE, log_scale, bias)
        return self.config.model.coca.contrastive_weight * contrastive, {**metrics, "contrastive_loss": contrastive}

    def embed_pair_and_local_loss(self, model: Coca, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None
                                  ) -> tuple[tuple[jax.Array, jax.Array], jax.Array, dict[str, jax.Array]]:
        """((image, text) embeddings, caption_weight x caption loss, caption metrics) from one forward pass.
        The caption loss is this batch's mean (per example or per token, as model.caption.loss_reduction)."""
        caption = self.config.model.caption
        zimg_BxE, ztxt_BxE, logits_BxLxV = model(batch["image"], batch["text"], rngs)
        _, targets_BxL, mask_BxL = teacher_forcing(batch["text"])
        loss, metrics = caption_loss(logits_BxLxV, targets_BxL, mask_BxL, caption.loss_reduction,
                                     caption.label_smoothing)
        return (zimg_BxE, ztxt_BxE), self.config.model.coca.caption_weight * loss, {**metrics, "caption_loss": loss}

    def local_loss_weight(self, micro_batch: dict[str, jax.Array]) -> jax.Array:
        """A micro-batch's share of the caption loss: its rows (per-example mean) or its supervised tokens."""
        return caption_loss_weight(micro_batch["text"], self.config.model.caption.loss_reduction)
