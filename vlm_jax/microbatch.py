"""Gradients over micro-batches: the full batch's loss and gradients with one piece's activation memory.

Plain accumulation (`accumulated_grads`), for losses that are a (weighted) mean of per-example or per-token terms:
the micro-batch gradients are summed with weights `task.loss_weight(micro_batch) / total` (default: equal), so a
per-token mean over the whole batch is reproduced exactly when the weight is the micro-batch's token count.

Cached embeddings (`cached_embedding_grads`), for contrastive losses, where every example is a negative for every
other: with `microbatches = k`, the batch is processed in k pieces and the loss and gradients are still those of
the full batch (GradCache, Gao et al. 2021):
  1. embed every micro-batch without keeping activations -> all B image and text embeddings;
  2. the loss over all B pairs and its gradient with respect to the embeddings and the temperature;
  3. per micro-batch, recompute its embeddings and back-propagate the cached embedding gradients;
     the temperature's gradient comes from step 2 directly.
Micro-batch j takes the j-th slice of every device's rows, so splitting moves no data between devices.

A loss = a batch-coupled term on the embeddings + a per-example term (CoCa: contrastive + captioning) works the
same way when the task also has `embed_pair_and_local_loss(model, micro_batch) -> ((zimg, ztxt), local_loss,
local_metrics)`, `local_loss` being the micro-batch's mean of the per-example term, and optionally
`local_loss_weight(micro_batch)` (its share of the full batch's mean: rows or tokens; default equal). Steps 1 and
2 are unchanged (`embed_pair` and `loss_from_embeddings` only: CoCa's step 1 runs the ViT, the contrastive pooler
and the unimodal text layers, not the decoder), so the coupled term still sees all B x B pairs: full-batch
negatives. Step 3 runs `embed_pair_and_local_loss` instead and back-propagates (cached embedding gradients,
w_j = weight_j / sum of weights) through (embeddings, local loss) in one vjp: the per-example term's gradient
is sum_j w_j grad(local_j), the full batch's mean. The loss is step 2's plus sum_j w_j local_j; local metrics
are averaged with the same weights (exact for means taken like the loss). Without that method (the contrastive
task) step 3 is exactly as above.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


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
                           k: int, ways: int, rng: jax.Array | None = None) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, metrics), grads) of the full-batch loss, computed in `k` micro-batches of `ways`-sharded rows.
    With `rng` (training), micro-batch j's embeddings draw their randomness (patch dropout) from
    nnx.Rngs(fold_in(rng, j)), in step 1 and again, identically, in step 3."""
    micro = {key: split(value, k, ways) for key, value in batch.items()}
    keys = micro_keys(rng, k)

    def embed(p, micro_batch, key):
        return task.embed_pair(merge_params(p), micro_batch, training_rngs(key))

    zimg, ztxt = jax.lax.map(lambda inputs: embed(jax.lax.stop_gradient(params), *inputs), (micro, keys))
    zimg, ztxt = merge(zimg, ways), merge(ztxt, ways)

    def loss_from(zimg, ztxt, p):
        return task.loss_from_embeddings(zimg, ztxt, *task.temperature(merge_params(p)))

    (loss, metrics), (dzimg, dztxt, grads) = jax.value_and_grad(loss_from, argnums=(0, 1, 2), has_aux=True)(
        zimg, ztxt, params)  # `grads` holds the temperature's gradient; the towers' come next
    dzimg, dztxt = split(dzimg, k, ways), split(dztxt, k, ways)
    if hasattr(task, "embed_pair_and_local_loss"):
        return with_local_terms(task, merge_params, params, micro, (dzimg, dztxt), (loss, metrics), grads, keys)

    def accumulate(total, inputs):
        micro_batch, dzimg_i, dztxt_i, key = inputs
        _, backward = jax.vjp(lambda p: embed(p, micro_batch, key), params)
        (tower_grads,) = backward((dzimg_i, dztxt_i))
        return jax.tree.map(jnp.add, total, tower_grads), None

    grads, _ = jax.lax.scan(accumulate, grads, (micro, dzimg, dztxt, keys))
    return (loss, metrics), grads


def micro_keys(rng: jax.Array | None, k: int) -> jax.Array | None:
    """Micro-batch j's key fold_in(rng, j), as [k] keys (None without `rng`)."""
    return None if rng is None else jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))


def training_rngs(key: jax.Array | None) -> nnx.Rngs | None:
    """A fresh nnx.Rngs on `key` (its draws start over: step 3 replays step 1's), or None (no randomness)."""
    return None if key is None else nnx.Rngs(key)


def with_local_terms(task, merge_params: Callable[[Any], Any], params: Any, micro: dict[str, jax.Array],
                     cotangents: tuple[jax.Array, jax.Array], coupled: tuple[jax.Array, dict], grads: Any,
                     keys: jax.Array | None) -> tuple[tuple[jax.Array, dict], Any]:
    """Step 3 for a loss with a per-example term: each micro-batch's vjp through (embeddings, local loss) with
    (its cached embedding gradients, its weight); `coupled` is step 2's (loss, metrics), `grads` its gradient."""
    weight_of = getattr(task, "local_loss_weight", None)
    k = jax.tree.leaves(micro)[0].shape[0]
    weights = jax.lax.map(weight_of, micro).astype(jnp.float32) if weight_of else jnp.ones((k,), jnp.float32)
    total = jnp.sum(weights)
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1), 0)  # no term at all: weight 0

    def pair_and_local(p, micro_batch, key):
        (zimg, ztxt), local, local_metrics = task.embed_pair_and_local_loss(merge_params(p), micro_batch,
                                                                            training_rngs(key))
        return (zimg, ztxt, local), local_metrics

    def accumulate(total_grads, inputs):
        micro_batch, dzimg_i, dztxt_i, weight, key = inputs
        (_, _, local), backward, local_metrics = jax.vjp(lambda p: pair_and_local(p, micro_batch, key), params,
                                                         has_aux=True)
        (micro_grads,) = backward((dzimg_i, dztxt_i, weight.astype(local.dtype)))
        return jax.tree.map(jnp.add, total_grads, micro_grads), (local, local_metrics)

    grads, (locals_k, metrics_k) = jax.lax.scan(accumulate, grads, (micro, *cotangents, weights, keys))
    weighted = lambda x: jnp.tensordot(weights, x.astype(jnp.float32), axes=1)  # noqa: E731
    loss, metrics = coupled
    return (loss + weighted(locals_k), {**metrics, **jax.tree.map(weighted, metrics_k)}), grads


def accumulated_grads(loss_of: Callable, task, params: Any, batch: dict[str, jax.Array], rng: jax.Array, k: int,
                      ways: int) -> tuple[tuple[jax.Array, tuple[dict, Any]], Any]:
    """((loss, (metrics, model_state)), grads) of the full batch from `k` micro-batches, in the form of
    `jax.value_and_grad(loss_of, has_aux=True)(params, batch, rng)`. Micro-batch j draws its randomness from
    fold_in(rng, j); metrics are weighted like the loss; the model state is the last micro-batch's."""
    micro = {key: split(value, k, ways) for key, value in batch.items()}
    weight_of = getattr(task, "loss_weight", None)
    weights = jax.lax.map(weight_of, micro).astype(jnp.float32) if weight_of else jnp.ones((k,), jnp.float32)
    total = jnp.sum(weights)  # 0 for an all-padding (placeholder) batch: equal weights, not 0 / 0
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / k)

    def accumulate(total, inputs):
        micro_batch, weight, index = inputs
        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(
            params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(lambda t, g: t + weight * g, total, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, (metrics, model_states)) = jax.lax.scan(accumulate, zeros, (micro, weights, jnp.arange(k)))
    weighted = lambda x: jnp.tensordot(weights, x.astype(jnp.float32), axes=1)  # noqa: E731
    return (weighted(losses), (jax.tree.map(weighted, metrics), jax.tree.map(lambda x: x[-1], model_states))), grads
