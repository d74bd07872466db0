"""Contrastive losses distributed over the data-parallel mesh axes with shard_map collectives.

Shape key: B global batch, b per-device batch (B / n over n data-parallel devices), E embedding width.

- SigLIP as a ring (big_vision's "chunked" sigmoid loss): each device keeps its b image embeddings and passes
  its text block around the ring with `ppermute`; n steps each score one b x b block, so no device ever holds
  more than b x b logits (the ring body is rematerialised, so the backward pass does not keep them either).
- CLIP softmax with all-gathered embeddings: each device scores its b images against all B texts and its b
  texts against all B images (b x B logits) and sums the local rows; the gradient through the all-gather
  equals the global loss's gradient.
Both return the same value as the single-device global loss in contrastive_losses.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlm_jax.tasks.contrastive_losses import MAX_LOGIT_SCALE


def _device_count(axes: Sequence[str]) -> jax.Array:
    return math.prod(jax.lax.axis_size(axis) for axis in axes)


def ring_sigmoid_loss(mesh: Mesh, axes: tuple[str, ...], zimg_BxE: jax.Array, ztxt_BxE: jax.Array,
                      log_scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP loss (summed over texts, averaged over images) with text blocks passed around a ring."""
    n = math.prod(mesh.shape[axis] for axis in axes)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(zimg_bxE, ztxt_bxE, log_scale, bias):
        scale = jnp.exp(log_scale)

        def block_loss(txt_bxE, positives: bool):
            logits_bxb = scale * zimg_bxE @ txt_bxE.T + bias
            labels_bxb = 2.0 * jnp.eye(logits_bxb.shape[0]) - 1.0 if positives else -1.0
            return -jnp.sum(jax.nn.log_sigmoid(labels_bxb * logits_bxb))

        @jax.checkpoint  # keep only the text block per step for the backward pass, not the b x b logits
        def step(_, carry):
            total, txt_bxE = carry
            txt_bxE = jax.lax.ppermute(txt_bxE, axes, ring)
            return total + block_loss(txt_bxE, positives=False), txt_bxE

        own = block_loss(ztxt_bxE, positives=True)
        total, _ = jax.lax.fori_loop(1, n, step, (own, ztxt_bxE))
        return jax.lax.psum(total, axes) / (zimg_bxE.shape[0] * _device_count(axes))

    batch = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, PartitionSpec(), PartitionSpec()),
                         out_specs=PartitionSpec())(zimg_BxE, ztxt_BxE, log_scale, bias)


def gathered_softmax_loss(mesh: Mesh, axes: tuple[str, ...], zimg_BxE: jax.Array, ztxt_BxE: jax.Array,
                          log_scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """CLIP loss from local rows: this device's images vs all texts and its texts vs all images."""
    del bias

    def local(zimg_bxE, ztxt_bxE, log_scale):
        scale = jnp.exp(jnp.minimum(log_scale, math.log(MAX_LOGIT_SCALE)))
        all_img_BxE = jax.lax.all_gather(zimg_bxE, axes, tiled=True)
        all_txt_BxE = jax.lax.all_gather(ztxt_bxE, axes, tiled=True)
        b = zimg_bxE.shape[0]
        targets_b = jax.lax.axis_index(axes) * b + jnp.arange(b)
        i2t_bxB = jax.nn.log_softmax(scale * zimg_bxE @ all_txt_BxE.T, axis=1)
        t2i_bxB = jax.nn.log_softmax(scale * ztxt_bxE @ all_img_BxE.T, axis=1)
        picked = (jnp.take_along_axis(i2t_bxB, targets_b[:, None], axis=1).sum()
                  + jnp.take_along_axis(t2i_bxB, targets_b[:, None], axis=1).sum())
        return -jax.lax.psum(picked, axes) / (2 * b * _device_count(axes))

    batch = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, PartitionSpec()),
                         out_specs=PartitionSpec())(zimg_BxE, ztxt_BxE, log_scale)


DISTRIBUTED_LOSSES = {"sigmoid": ring_sigmoid_loss, "softmax": gathered_softmax_loss}


def block_top1(zimg_bxE: jax.Array, ztxt_bxE: jax.Array) -> jax.Array:
    """Fraction of images whose most similar text in the block is their own."""
    similarity_bxb = zimg_bxE @ ztxt_bxE.T
    return jnp.mean(jnp.argmax(similarity_bxb, axis=1) == jnp.arange(similarity_bxb.shape[0]))


def local_block_top1(mesh: Mesh, axes: tuple[str, ...], zimg_BxE: jax.Array, ztxt_BxE: jax.Array) -> jax.Array:
    """block_top1 within each device's b pairs, averaged over devices (no B x B similarity anywhere)."""
    def local(zimg_bxE, ztxt_bxE):
        return jax.lax.pmean(block_top1(zimg_bxE, ztxt_bxE), axes)
    batch = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch), out_specs=PartitionSpec())(zimg_BxE, ztxt_BxE)
