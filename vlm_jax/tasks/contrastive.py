"""The contrastive objective (CLIP / ALIGN softmax, SigLIP sigmoid, LiT when the image tower is frozen).

Shape key: B batch, E embedding width.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from vlm_jax.flops import two_towers_train_flops_per_sample
from vlm_jax.models.two_towers import TwoTowers
from vlm_jax.parallel.contrastive import DISTRIBUTED_LOSSES, block_top1, local_block_top1
from vlm_jax.parallel.sharding import logical_to_mesh_spec
from vlm_jax.tasks.contrastive_losses import LOSSES
from vlm_jax.tasks.towers import image_text_batch, text_config, vit_config


class ContrastiveTask:
    """Builds a TwoTowers model from `config.model` and scores batches {"image", "text"}."""

    batch_keys = ("image", "text")
    predictions = ("embed",)  # what evaluators may ask of it (vlm_jax/evaluators/predict.py)
    default_evals = ("retrieval", "zeroshot")
    # Every example is a negative for every other: micro-batches cache embeddings (vlm_jax/microbatch.py).
    microbatching = "cached_embeddings"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config = config
        self.loss_fn = LOSSES[config.model.loss]
        self.mesh, self.loss_axes = mesh, ()
        if mesh is not None and config.model.loss_impl == "collective":
            spec = logical_to_mesh_spec(("batch",), config.sharding_rules, mesh)[0]
            self.loss_axes = (spec,) if isinstance(spec, str) else tuple(spec or ())

    def abstract_batch(self, batch_size: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch as the input pipeline delivers it (uint8 images)."""
        return image_text_batch(self.config, batch_size, sharding)

    def train_flops_per_sample(self) -> int:
        """Analytic model FLOPs of one training example (forward + backward), the numerator of MFU."""
        freeze = self.config.optim.freeze
        image_frozen = bool(freeze) and all(re.search(freeze, path) for path in ("image_encoder/", "image_proj/"))
        return two_towers_train_flops_per_sample(self.config.model, image_frozen)

    def build_model(self, rngs: nnx.Rngs) -> TwoTowers:
        m = self.config.model
        return TwoTowers(vit_config(m), text_config(m), m.embed_dim, m.loss, rngs,
                         image_projection=m.image_projection, proj_bias=m.arch != "clip")

    def loss(self, model: TwoTowers, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None,
             step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for one batch; `rngs` (the step's randomness) draw the image tower's patch
        dropout, if any; without them the loss is deterministic. `step` is unused: the objective is fixed."""
        zimg_BxE, ztxt_BxE = self.embed_pair(model, batch, rngs)
        return self.loss_from_embeddings(zimg_BxE, ztxt_BxE, *model.temperature())

    @staticmethod
    def embed_pair(model: TwoTowers, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """L2-normalised (image, text) embeddings of a batch: what micro-batching caches. `rngs`: training."""
        return model.embed_image(batch["image"], rngs), model.embed_text(batch["text"])

    @staticmethod
    def temperature(model: TwoTowers) -> tuple[jax.Array, jax.Array | None]:
        return model.temperature()

    def loss_from_embeddings(self, zimg_BxE: jax.Array, ztxt_BxE: jax.Array, log_scale: jax.Array,
                             bias: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The batch loss given every pair's embeddings (all negatives in the batch count)."""
        if self.loss_axes:
            distributed = DISTRIBUTED_LOSSES[self.config.model.loss]
            loss = distributed(self.mesh, self.loss_axes, zimg_BxE, ztxt_BxE, log_scale, bias)
            top1 = local_block_top1(self.mesh, self.loss_axes, zimg_BxE, ztxt_BxE)
        else:
            loss = self.loss_fn(zimg_BxE, ztxt_BxE, log_scale, bias)
            top1 = block_top1(zimg_BxE, ztxt_BxE)
        metrics = {"logit_scale": jnp.exp(log_scale), "in_batch_i2t_top1": top1}
        if bias is not None:
            metrics["logit_bias"] = bias
        return loss, metrics

    @staticmethod
    def embed_image(model: TwoTowers, image: jax.Array) -> jax.Array:
        return model.embed_image(image)

    @staticmethod
    def embed_text(model: TwoTowers, tokens: jax.Array) -> jax.Array:
        return model.embed_text(tokens)
