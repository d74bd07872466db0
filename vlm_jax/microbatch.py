"""Gradients over micro-batches with embeddings cached, so a contrastive batch keeps all its negatives.

With `microbatches = k`, the batch is processed in k pieces (activation memory of one piece), and the loss and
gradients are those of the full batch (GradCache, Gao et al. 2021):
  1. embed every micro-batch without keeping activations -> all B image and text embeddings;
  2. the loss over all B pairs and its gradient with respect to the embeddings and the temperature;
  3. per micro-batch, recompute its embeddings and back-propagate the cached embedding gradients;
     the temperature's gradient comes from step 2 directly.
Micro-batch j takes the j-th slice of every device's rows, so splitting moves no data between devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def split(array: jax.Array, k: int, ways: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]: micro-batch j holds the j-th 1/k of each of the `ways` device blocks."""
    block = array.shape[0] // ways
    pieces = array.reshape(ways, k, block // k, *array.shape[1:])
    return jnp.swapaxes(pieces, 0, 1).reshape(k, array.shape[0] // k, *array.shape[1:])


def merge(array: jax.Array, ways: int) -> jax.Array:
    """Inverse of `split`: [k, B/k, ...] -> [B, ...] in the original row order."""
    k, rows = array.shape[:2]
    pieces = array.reshape(k, ways, rows // ways, *array.shape[2:])
    return jnp.swapaxes(pieces, 0, 1).reshape(k * rows, *array.shape[2:])


def cached_embedding_grads(task, merge_params: Callable[[Any], Any], params: Any, batch: dict[str, jax.Array],
                           k: int, ways: int) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, metrics), grads) of the full-batch loss, computed in `k` micro-batches of `ways`-sharded rows."""
    micro = {key: split(value, k, ways) for key, value in batch.items()}

    def embed(p, micro_batch):
        return task.embed_pair(merge_params(p), micro_batch)

    zimg, ztxt = jax.lax.map(lambda mb: embed(jax.lax.stop_gradient(params), mb), micro)
    zimg, ztxt = merge(zimg, ways), merge(ztxt, ways)

    def loss_from(zimg, ztxt, p):
        return task.loss_from_embeddings(zimg, ztxt, *task.temperature(merge_params(p)))

    (loss, metrics), (dzimg, dztxt, grads) = jax.value_and_grad(loss_from, argnums=(0, 1, 2), has_aux=True)(
        zimg, ztxt, params)  # `grads` holds the temperature's gradient; the towers' come next
    dzimg, dztxt = split(dzimg, k, ways), split(dztxt, k, ways)

    def accumulate(total, inputs):
        micro_batch, dzimg_i, dztxt_i = inputs
        _, backward = jax.vjp(lambda p: embed(p, micro_batch), params)
        (tower_grads,) = backward((dzimg_i, dztxt_i))
        return jax.tree.map(jnp.add, total, tower_grads), None

    grads, _ = jax.lax.scan(accumulate, grads, (micro, dzimg, dztxt))
    return (loss, metrics), grads
