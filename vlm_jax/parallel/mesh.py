"""Device meshes from config: axes (data, fsdp, sequence, tensor), each an in-slice (ici) size, one of which
may be -1, times an across-slice (dcn) size `dcn_<axis>` for multi-slice jobs.

Multi-slice meshes come from `mesh_utils.create_hybrid_device_mesh`, so the dcn part of each axis crosses
slices and the ici part stays inside one: TPU devices know their slice; elsewhere each process is a granule;
a single CPU process splits its devices into contiguous blocks (to try multi-slice layouts on one machine).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from vlm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def dcn_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    sizes = tuple(cfg.get(f"dcn_{axis}", 1) for axis in MESH_AXES)
    if any(size < 1 for size in sizes):
        raise ConfigError(f"dcn mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive")
    return sizes


def resolve_mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """In-slice sizes of MESH_AXES with a -1 filled in; fails naming the sizes when they do not fit."""
    sizes = [cfg.get(axis, 1) for axis in MESH_AXES]
    slices = math.prod(dcn_shape(cfg))
    if num_devices % slices:
        raise ConfigError(f"dcn mesh sizes {dict(zip(MESH_AXES, dcn_shape(cfg)))} do not divide "
                          f"{num_devices} devices")
    per_slice = num_devices // slices
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {per_slice} devices")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
            f"but there are {num_devices} devices" + (f" in {slices} slices" if slices > 1 else ""))
    return tuple(sizes)


def _simulated_hybrid(ici: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    """Contiguous device blocks as slices: axis i = dcn[i] blocks of ici[i] devices."""
    blocks = np.array(devices).reshape(*dcn, *ici)
    order = [i for pair in zip(range(len(dcn)), range(len(dcn), 2 * len(dcn))) for i in pair]
    return blocks.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def hybrid_device_array(ici: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    if len({getattr(device, "slice_index", 0) for device in devices}) > 1:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    if jax.process_count() == math.prod(dcn):
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    return _simulated_hybrid(ici, dcn, devices)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with GSPMD-style (Auto) axes; axis size = dcn x ici."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_mesh_shape(cfg, len(devices)), dcn_shape(cfg)
    if math.prod(dcn) > 1:
        device_array = hybrid_device_array(ici, dcn, devices)
    elif len(devices) > 1:
        # a mesh axis may span part of a physical one (data 32 x fsdp 8 on a 16 x 16 v6e-256)
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        device_array = np.array(devices).reshape(ici)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
