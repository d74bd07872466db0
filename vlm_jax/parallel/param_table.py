"""The start-up table of parameters (shape, partition spec, bytes per device) and the replication check."""

from __future__ import annotations

import dataclasses

from vlm_jax.config import ConfigError
from vlm_jax.parallel.sharding import shard_factor
from vlm_jax.pytree import leaves_with_path_str


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    spec: str
    total_bytes: int
    device_bytes: int  # bytes of this parameter held by each device

    @property
    def replicated(self) -> bool:
        return self.total_bytes == self.device_bytes


def parameter_rows(abstract_params, param_shardings) -> list[ParamRow]:
    shardings = dict(leaves_with_path_str(param_shardings))
    rows = []
    for path, leaf in leaves_with_path_str(abstract_params):
        sharding = shardings[path]
        total = leaf.size * leaf.dtype.itemsize
        rows.append(ParamRow(path, tuple(leaf.shape), str(tuple(sharding.spec)), total,
                             total // shard_factor(sharding)))
    return rows


def format_table(rows: list[ParamRow]) -> str:
    """One line per parameter plus totals: path, shape, partition spec, bytes per device."""
    width = max(len(row.path) for row in rows)
    lines = [f"{'parameter':<{width}}  {'shape':<20} {'partition spec':<28} {'bytes/device':>14}"]
    lines += [f"{row.path:<{width}}  {str(row.shape):<20} {row.spec:<28} {row.device_bytes:>14,}" for row in rows]
    total, per_device = sum(r.total_bytes for r in rows), sum(r.device_bytes for r in rows)
    replicated = sum(r.total_bytes for r in rows if r.replicated)
    lines.append(f"total {total:,} bytes; {per_device:,} per device; {replicated / total:.1%} replicated")
    return "\n".join(lines)


def check_replication(rows: list[ParamRow], fsdp: int, max_fraction: float) -> None:
    """With fsdp > 1, fails if more than `max_fraction` of the parameter bytes is replicated on every device."""
    if fsdp <= 1:
        return
    total = sum(r.total_bytes for r in rows)
    replicated = sum(r.total_bytes for r in rows if r.replicated)
    if replicated > max_fraction * total:
        largest = max((r for r in rows if r.replicated), key=lambda r: r.total_bytes)
        raise ConfigError(f"{replicated / total:.1%} of the parameter bytes stay replicated with fsdp={fsdp} "
                          f"(limit {max_fraction:.0%}, mesh.max_replicated_fraction); largest: {largest.path} "
                          f"{largest.shape} {largest.spec}: check sharding_rules")


def log_parameter_table(abstract_params, param_shardings, fsdp: int, max_fraction: float, log) -> None:
    rows = parameter_rows(abstract_params, param_shardings)
    log(format_table(rows))
    check_replication(rows, fsdp, max_fraction)
