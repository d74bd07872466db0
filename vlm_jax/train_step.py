"""The one jitted train step shared by every objective."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from vlm_jax import optim
from vlm_jax.microbatch import accumulated_grads, cached_embedding_grads
from vlm_jax.parallel.sharding import activation_sharding, shard_factor
from vlm_jax.train_state import StateLayout, TrainState, step_rng

# Optional batch key: int32 [B], 1 on the rows of a process with data, 0 or -1 on those of a process whose data
# ran out or failed. A step whose batch has any row below 1 changes nothing, so the processes keep stepping in
# lockstep until all agree to stop (run_health.py).
VALID_KEY = "valid"


def make_train_step(task, layout: StateLayout, batch_sharding: NamedSharding, microbatches: int = 1
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]:
    """jit(step) with explicit in/out shardings; the incoming state is donated.

    Gradients are taken only for trainable parameters (`optim.freeze` stops the others), so a locked tower runs
    no backward pass. With `microbatches` > 1 the batch is processed in pieces, with one piece's activation memory:
    tasks whose loss couples the examples (contrastive) cache embeddings (`task.microbatching =
    "cached_embeddings"`), the others accumulate gradients. Either way the loss and gradients are the full batch's.
    Every task's loss is called as `task.loss(model, batch, rngs, step=...)`, `step` the state's step number
    (a traced int32 scalar) for objectives that change during training. Metrics: the task's, plus loss, grad_norm (before clipping, trainable parameters only), lr, and `finite`
    (loss, gradients and the updated parameters finite) for the trainer's health check.
    """
    data_ways = shard_factor(batch_sharding)
    trainable = trainable_mask(layout.abstract_state["params"], task.config.optim.freeze)
    mode = getattr(task, "microbatching", "accumulate")

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        with activation_sharding(batch_sharding.mesh, task.config.sharding_rules):
            return step_body(state, batch)

    def step_body(state: TrainState, batch: dict[str, jax.Array]):
        batch = dict(batch)
        valid = batch.pop(VALID_KEY, None)
        rng, model_state = step_rng(state), state["model_state"]

        def merge(params, micro_rng=rng):
            return layout.merge(stop_frozen(params, trainable), model_state, micro_rng)

        def loss_of(params, micro_batch, micro_rng):
            model = merge(params, micro_rng)
            loss, metrics = task.loss(model, micro_batch, nnx.Rngs(micro_rng), step=state["step"])
            return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not((nnx.Param, nnx.RngState)))))

        if microbatches > 1 and mode == "cached_embeddings":
            (loss, metrics), grads = cached_embedding_grads(task, merge, state["params"], batch, microbatches,
                                                            data_ways, rng)
            new_model_state = model_state
        elif microbatches > 1:
            (loss, (metrics, new_model_state)), grads = accumulated_grads(
                loss_of, task, state["params"], batch, rng, microbatches, data_ways)
        else:
            (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                state["params"], batch, rng)
        updates, opt_state = layout.tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t])
        new_state = {"step": state["step"] + 1, "rng": state["rng"],
                     "params": optax.apply_updates(state["params"], updates), "model_state": new_model_state,
                     "opt_state": opt_state}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": layout.schedule(state["step"]),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_state["params"])}
        if valid is not None:  # every process had data for this step, or nothing changes
            metrics["data_status"] = jnp.min(valid)
            has_data = metrics["data_status"] > 0
            new_state = jax.tree.map(lambda new, old: jnp.where(has_data, new, old), new_state, state)
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(layout.shardings, batch_sharding),
                   out_shardings=(layout.shardings, None), donate_argnums=0)


def all_finite(tree: Any) -> jax.Array:
    """True when no leaf holds a NaN or an infinity (an elementwise pass XLA fuses into the update)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def trainable_mask(params: Any, freeze: str) -> Any:
    """True for every parameter that `freeze` (the optim.freeze regex; empty: none) does not match."""
    if not freeze:
        return jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda frozen: not frozen, optim.regex_mask(params, freeze))


def stop_frozen(params: Any, trainable: Any) -> Any:
    """`params` with the frozen leaves behind stop_gradient: no gradient, and no backward pass, reaches them."""
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
