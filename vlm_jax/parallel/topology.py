"""TPU topologies by name, and their devices for ahead-of-time compilation from any host.

Names are what Cloud TPU calls a slice (`v5p-256`: 256 TensorCores = 128 chips; `v6e-256`: 256 chips) or what
libtpu calls a topology (`v5p:4x4x8`, `v6e:16x16`). With jax's TPU support installed (the `tpu` extra:
libtpu), `tpu_devices` returns compile-only devices of that topology, so `jit(...).lower(...).compile()` runs
the real TPU compiler, Mosaic included, on a machine without a TPU.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures (Cloud TPU documentation)."""
    cores_per_name_unit: int    # slice names count TensorCores (v4, v5p: 2 per chip) or chips (v5e, v6e)
    dims: int                   # torus dimensions of its topology names (3 for v4 / v5p, 2 for v5e / v6e)
    hbm_bytes: int
    peak_bf16_flops: float      # per chip
    hbm_bytes_per_s: float      # per chip


CHIPS = {
    "v4": Chip(2, 3, 32 * GIB, 275e12, 1.228e12),
    "v5p": Chip(2, 3, 95 * GIB, 459e12, 2.765e12),
    "v5e": Chip(1, 2, 16 * GIB, 197e12, 0.819e12),
    "v6e": Chip(1, 2, 32 * GIB, 918e12, 1.640e12),
}
# Slice shapes by chip count: the standard Cloud TPU shapes (2-D for v5e / v6e, 3-D tori for v4 / v5p).
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8960: "16x20x28"}
# The smallest multi-chip slice of each generation the project targets (compile tests, `bench vmem`).
SMALL_SLICES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}


class TopologyError(ValueError):
    """An unknown or unsupported topology name; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str
    chips: int
    shape: str  # libtpu's name, e.g. "4x4x8"

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{self.shape}"


def known_names() -> list[str]:
    """Every slice name this table knows, e.g. v5e-16, v5p-256, v6e-256."""
    names = []
    for generation, chip in CHIPS.items():
        shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        names += [f"{generation}-{chips * chip.cores_per_name_unit}" for chips in shapes]
    return names


def _unknown(name: str) -> TopologyError:
    return TopologyError(f"unknown TPU topology {name!r}; known names: {', '.join(known_names())} "
                         "(or libtpu's GEN:AxB[xC], e.g. v5p:4x4x8)")


def parse_topology(name: str) -> Topology:
    """'v5p-256' -> Topology('v5p', 128 chips, '4x4x8'); 'v6e:16x16' -> Topology('v6e', 256, '16x16')."""
    slice_name = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if slice_name:
        generation, size = slice_name.group(1), int(slice_name.group(2))
        chip = CHIPS[generation]
        chips, rest = divmod(size, chip.cores_per_name_unit)
        shape = (SHAPES_3D if chip.dims == 3 else SHAPES_2D).get(chips)
        if rest or shape is None:
            raise _unknown(name)
        return Topology(generation, chips, shape)
    libtpu_name = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if libtpu_name:
        generation, shape = libtpu_name.groups()
        sizes = [int(n) for n in shape.split("x")]
        if len(sizes) != CHIPS[generation].dims or 0 in sizes:
            raise _unknown(name)
        return Topology(generation, math.prod(sizes), shape)
    raise _unknown(name)


def tpu_devices(topology: Topology, num_slices: int = 1) -> list:
    """Compile-only devices of `num_slices` slices of `topology` (devices of slice s have slice_index s).

    Raises RuntimeError when jax has no TPU support here (libtpu not installed), TopologyError when the
    installed libtpu does not know the topology."""
    from jax.experimental import topologies
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    if topology.chips < 4:  # smaller than libtpu's default host (2x2x1 chips)
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        return list(topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise RuntimeError("jax has no TPU support here: install the tpu extra (pip install -e '.[tpu]')") from e
        if "INVALID_ARGUMENT" not in str(e):  # e.g. another process holds libtpu's lockfile
            raise RuntimeError(f"libtpu failed: {str(e).splitlines()[0]}") from e
        raise TopologyError(f"the installed libtpu does not know TPU topology {topology.libtpu_name!r}: "
                            f"{str(e).splitlines()[0]}; known names: {', '.join(known_names())}") from e
