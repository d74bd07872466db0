"""Logical axis names -> mesh axes, by the rules table in the config."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlm_jax.config import ConfigError

Rules = Sequence[tuple[str, Any]]


def logical_to_mesh_spec(logical: Sequence[str | None], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array whose dimensions carry `logical` names.

    A mesh axis already used by an earlier dimension, or of size 1, is dropped (replicated).
    """
    table = dict(rules)
    used, spec = set(), []
    for name in logical:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(f"unknown logical axis {name!r}; sharding_rules name {tuple(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def logical_shardings(logical_specs: Any, rules: Rules, mesh: Mesh) -> Any:
    """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules, mesh)),
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of an input batch: the leading dimension over the `batch` logical axis."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_factor(sharding: NamedSharding) -> int:
    """Into how many pieces the sharding splits an array (the product of the mesh axes its spec uses)."""
    axes = [axis for entry in sharding.spec if entry is not None
            for axis in ((entry,) if isinstance(entry, str) else entry)]
    return int(np.prod([sharding.mesh.shape[axis] for axis in axes]))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split."""
    spec = logical_to_mesh_spec(("batch",), rules, mesh)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def to_global_batch(host_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's part of a batch -> global jax.Arrays laid out by `sharding`."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in host_batch.items()}


_active: list[tuple[Mesh, Rules]] = []  # the (mesh, rules) that activation constraints resolve against


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh by their logical names."""
    _active.append((mesh, rules))
    try:
        yield
    finally:
        _active.pop()


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the innermost `activation_sharding`, or None outside one."""
    return _active[-1] if _active else None


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical axis names (e.g. activation_batch, activation_length,
    activation_embed); a no-op outside `activation_sharding` (plain model calls, tests, evaluation)."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh)))
