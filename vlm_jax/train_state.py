"""The train state as a plain pytree {"step", "params", "opt_state"}, placed on the mesh by logical rules."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from vlm_jax import optim
from vlm_jax.parallel.sharding import logical_shardings, replicated
from vlm_jax.pytree import leaves_with_path_str, map_with_path_str

# One way to place variables everywhere: build abstract state, derive shardings, jit the initialiser.
flax.config.update("flax_always_shard_variable", False)

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything static about the train state: model structure, optimizer, shapes and shardings."""

    graphdef: nnx.GraphDef
    build_model: Callable[[nnx.Rngs], nnx.Module]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState
    param_logical_specs: Any

    def merge(self, params: Any) -> nnx.Module:
        """The model with `params` (a pure dict)."""
        return nnx.merge(self.graphdef, params)


def make_state_layout(task, config: ml_collections.ConfigDict, mesh: Mesh) -> StateLayout:
    """Shapes and shardings of the train state for `task`'s model, without allocating it."""
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    abstract_params = nnx.to_pure_dict(abstract_params)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
    param_shardings = logical_shardings(logical_specs, config.sharding_rules, mesh)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optimizer_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh)
    shardings = {"step": replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt_state}
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateLayout(graphdef, task.build_model, tx, schedule, abstract_state, shardings, logical_specs)


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                              mesh: Mesh) -> Any:
    """Each optimizer-state leaf shaped like a parameter (moments) is sharded like that parameter,
    found by the parameter's path ending the leaf's path; everything else (counts, factored moments)
    is replicated."""
    by_path = {path: (x.shape, sharding) for (path, x), (_, sharding) in
               zip(leaves_with_path_str(abstract_params), leaves_with_path_str(param_shardings))}

    def sharding_for(path: str, leaf: jax.ShapeDtypeStruct):
        parts = path.split("/")
        for start in range(len(parts)):
            shape, sharding = by_path.get("/".join(parts[start:]), (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated(mesh)

    return map_with_path_str(sharding_for, abstract_opt_state)


def init_train_state(layout: StateLayout, seed: int) -> TrainState:
    """A fresh train state, created directly in its shardings."""

    def init(rng: jax.Array) -> TrainState:
        params = nnx.to_pure_dict(nnx.state(layout.build_model(nnx.Rngs(params=rng))))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": layout.tx.init(params)}

    return jax.jit(init, out_shardings=layout.shardings)(jax.random.key(seed))


def param_count(layout: StateLayout) -> int:
    return sum(x.size for x in jax.tree.leaves(layout.abstract_state["params"]))
