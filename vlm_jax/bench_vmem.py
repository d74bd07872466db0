"""VMEM of the TPU flash-attention kernels, from the TPU compiler (`python -m vlm_jax.bench vmem`).

Mosaic refuses a kernel that needs more VMEM than its `vmem_limit_bytes`. The smallest limit at which a program
compiles, found by bisection, is the VMEM it uses: for the forward kernel alone, and for forward + backward (the
largest of the forward, dq and dk/dv kernels). Needs the `tpu` extra (libtpu); runs on any host.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.topology import parse_topology, tpu_devices

KIB = 2**10
TOPOLOGIES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 2, 64


def smallest_passing(passes: Callable[[int], bool], high: int = 64 * 2**20, resolution: int = 4 * KIB) -> int:
    """The smallest multiple of `resolution` up to `high` for which `passes` holds (it must be monotone)."""
    low = 0  # fails (or untried); high passes
    if not passes(high):
        raise RuntimeError(f"the kernel does not compile even with {high // 2**20} MiB of VMEM")
    while high - low > resolution:
        middle = (low + high) // 2 // resolution * resolution
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


def _program(length: int, backward: bool, limit: int):
    prefix = jnp.full((BATCH,), length // 2, jnp.int32)

    def attention(q, k, v, prefix):
        return flash_attention(q, k, v, MaskSpec(prefix_len_B=prefix), platform="tpu", vmem_limit_bytes=limit)

    if not backward:
        return attention
    return lambda q, k, v, prefix: jax.vjp(lambda q, k, v: attention(q, k, v, prefix), q, k, v)[1](q)


def compiles_within(device, length: int, backward: bool, dtype, limit: int) -> bool:
    """Whether the prefix-LM, grouped-query program compiles for `device` with `limit` bytes of VMEM."""
    sharding = SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((BATCH, length, HEADS, HEAD_DIM), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((BATCH, length, KV_HEADS, HEAD_DIM), dtype, sharding=sharding)
    prefix = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=sharding)
    try:
        jax.jit(_program(length, backward, limit)).lower(q, kv, kv, prefix).compile()
        return True
    except jax.errors.JaxRuntimeError as e:
        if "vmem" in str(e).lower():
            return False
        raise


def bench_vmem(lengths: list[int], dtype: str = "bfloat16") -> dict:
    """VMEM per kernel program (KiB) for each generation and length: prefix-LM mask, 8 query heads sharing
    2 key/value heads of dimension 64."""
    rows = []
    for generation, topology in TOPOLOGIES.items():
        device = tpu_devices(parse_topology(topology))[0]
        for length in lengths:
            row = {"generation": generation, "length": length}
            for name, backward in (("forward_kib", False), ("forward_backward_kib", True)):
                row[name] = smallest_passing(
                    lambda limit: compiles_within(device, length, backward, jnp.dtype(dtype), limit)) // KIB
            rows.append(row)
    return {"bench": "vmem", "kernel": "flash_attention (TPU, streamed K/V)", "mask": "prefix-LM",
            "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": dtype, "resolution_kib": 4,
            "rows": rows}
