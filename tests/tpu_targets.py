"""Shared by the TPU-compile tests: compile-only TPU devices (libtpu's compiler from this CPU host) and how to
find the Mosaic kernels in a compiled program."""

import functools

import jax
from jax.sharding import SingleDeviceSharding

from vlm_jax.parallel.topology import SMALL_SLICES as GENERATIONS, parse_topology, tpu_devices


@functools.cache
def devices(generation: str, slices: int = 1) -> tuple:
    """Compile-only devices of `slices` slices of the generation's test topology."""
    return tuple(tpu_devices(parse_topology(GENERATIONS[generation]), slices))


def on_one_chip(generation: str, tree):
    """ShapeDtypeStructs of `tree`'s arrays placed on the first chip (a Pallas call needs one device)."""
    sharding = SingleDeviceSharding(devices(generation)[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def mosaic_kernels(compiled) -> int:
    """How many Mosaic (Pallas TPU) kernels the compiled program calls."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')
