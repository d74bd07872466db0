"""The train state as a plain pytree, placed on the mesh by logical rules:

    {"step": int32, "rng": uint32 key data, "params": nnx.Param values (optimised),
     "model_state": every other NNX variable (batch statistics, ...; carried, not optimised), "opt_state": ...}

NNX RNG state inside the model (a module holding its own `nnx.Rngs`) is neither optimised nor saved: each step
re-seeds it from the train state's key (`step_rngs`).
"""

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
RUN_KEY_SALT = 1_000_003  # keeps the run's key apart from the parameter-initialisation key


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything static about the train state: model structure, optimizer, shapes and shardings."""

    graphdef: nnx.GraphDef
    build_model: Callable[[nnx.Rngs], nnx.Module]
    abstract_rng_state: Any  # the model's own RNG variables (pure dict), re-seeded every step
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState
    param_logical_specs: Any

    def merge(self, params: Any, model_state: Any = None, rng: jax.Array | None = None) -> nnx.Module:
        """The model with `params` and `model_state` (pure dicts); its own RNG streams seeded from `rng`.

        `model_state` may be omitted only for models that have none (every model without batch statistics)."""
        if model_state is None:
            model_state = self.abstract_state["model_state"]
            if jax.tree.leaves(model_state):
                raise ValueError("this model has non-parameter state (e.g. batch statistics): pass model_state")
        rng_state = seeded_rng_state(self.abstract_rng_state, jax.random.key(0) if rng is None else rng)
        return nnx.merge(self.graphdef, params, model_state, rng_state)


def make_state_layout(task, config: ml_collections.ConfigDict, mesh: Mesh) -> StateLayout:
    """Shapes and shardings of the train state for `task`'s model, without allocating it."""
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, abstract_rng_state, abstract_model_state = nnx.split(
        abstract_model, nnx.Param, nnx.RngState, ...)
    logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    model_state_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_model_state))
    abstract_params = nnx.to_pure_dict(abstract_params)
    abstract_model_state = nnx.to_pure_dict(abstract_model_state)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
    param_shardings = logical_shardings(logical_specs, config.sharding_rules, mesh)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optimizer_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh)
    shardings = {"step": replicated(mesh), "rng": replicated(mesh), "params": param_shardings,
                 "model_state": logical_shardings(model_state_specs, config.sharding_rules, mesh),
                 "opt_state": opt_shardings}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(run_key_data, jnp.uint32(0)),
              "params": abstract_params, "model_state": abstract_model_state, "opt_state": abstract_opt_state}
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateLayout(graphdef, task.build_model, nnx.to_pure_dict(abstract_rng_state), tx, schedule,
                       abstract_state, shardings, logical_specs)


def run_key_data(seed: jax.Array) -> jax.Array:
    """The run's key for dropout, masking and sampling, apart from the initialisation key `key(seed)`; stored
    as raw uint32 key data (what orbax saves)."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), RUN_KEY_SALT))


def step_rng(state: TrainState) -> jax.Array:
    """This step's key: the run's key folded with the step number, so a resumed run draws what an uninterrupted
    one would. Not folded with the process index: inside the jitted step every draw is one global array, whose
    rows already differ (a per-process key would make processes disagree on replicated values)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def seeded_rng_state(abstract_rng_state: Any, rng: jax.Array) -> Any:
    """The model's own RNG variables (NNX RngKey / RngCount), keys derived from `rng`, counts at zero."""
    leaves, treedef = jax.tree.flatten(abstract_rng_state)
    seeded = [jax.random.fold_in(rng, i) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
              else jnp.zeros(leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, seeded)


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

    def init(seed: jax.Array) -> TrainState:
        model = layout.build_model(nnx.Rngs(params=jax.random.key(seed)))
        _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
        params = nnx.to_pure_dict(params)
        return {"step": jnp.zeros((), jnp.int32), "rng": run_key_data(seed), "params": params,
                "model_state": nnx.to_pure_dict(model_state), "opt_state": layout.tx.init(params)}

    return jax.jit(init, out_shardings=layout.shardings)(jnp.uint32(seed))


def param_count(layout: StateLayout) -> int:
    return sum(x.size for x in jax.tree.leaves(layout.abstract_state["params"]))
