"""The one jitted train step shared by every objective."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import NamedSharding

from vlm_jax.microbatch import cached_embedding_grads
from vlm_jax.parallel.sharding import activation_sharding, shard_factor
from vlm_jax.train_state import StateLayout, TrainState


def make_train_step(task, layout: StateLayout, batch_sharding: NamedSharding, microbatches: int = 1
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]:
    """jit(step) with explicit in/out shardings; the incoming state is donated.

    With `microbatches` > 1 the batch is processed in pieces with cached embeddings (see microbatch.py): the
    same loss and gradients as the whole batch, with one piece's activation memory.
    """
    data_ways = shard_factor(batch_sharding)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        with activation_sharding(batch_sharding.mesh, task.config.sharding_rules):
            return step_body(state, batch)

    def step_body(state: TrainState, batch: dict[str, jax.Array]):
        def loss_of(params):
            return task.loss(layout.merge(params), batch)

        if microbatches > 1:
            (loss, metrics), grads = cached_embedding_grads(task, layout.merge, state["params"], batch,
                                                            microbatches, data_ways)
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = layout.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": layout.schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    batch_shardings = {key: batch_sharding for key in task.batch_keys}
    return jax.jit(train_step, in_shardings=(layout.shardings, batch_shardings),
                   out_shardings=(layout.shardings, None), donate_argnums=0)
