"""VMEM of the TPU flash-attention kernels, from the TPU compiler (`python -m vlm_jax.bench vmem`).

The forward + backward program is compiled for each generation and length; the compiled HLO records, for each
Mosaic kernel (flash_forward, flash_dq, flash_dkv), the scoped VMEM the compiler gave it
(`used_scoped_memory_configs`, memory space 1). Needs the `tpu` extra (libtpu); runs on any host.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.topology import SMALL_SLICES, parse_topology, tpu_devices

KIB = 2**10
VMEM_SPACE = "1"
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 2, 64


def kernel_vmem_bytes(hlo_text: str) -> dict[str, int]:
    """{kernel name: scoped VMEM bytes} for every Mosaic kernel of a compiled program's HLO."""
    found = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r"(flash_[a-z]+)\)*/pallas_call", line)
        configs = re.search(r'used_scoped_memory_configs\\?":(\[.*?\])', line)
        if name and configs:
            spaces = json.loads(configs.group(1).replace('\\"', '"'))
            found[name.group(1)] = sum(int(c["size"]) for c in spaces if c["memory_space"] == VMEM_SPACE)
    return found


def compiled_hlo(device, length: int, dtype) -> str:
    """The compiled HLO of forward + backward with a prefix-LM mask (prefix = half) and grouped-query heads."""
    sharding = SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((BATCH, length, HEADS, HEAD_DIM), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((BATCH, length, KV_HEADS, HEAD_DIM), dtype, sharding=sharding)
    prefix = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=sharding)

    def forward_backward(q, k, v, prefix):
        attention = lambda q, k, v: flash_attention(q, k, v, MaskSpec(prefix_len_B=prefix), platform="tpu")
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(out)

    return jax.jit(forward_backward).lower(q, kv, kv, prefix).compile().as_text()


def bench_vmem(lengths: list[int], dtype: str = "bfloat16") -> dict:
    """VMEM (KiB) of each flash kernel for each generation and length."""
    rows = []
    for generation, topology in SMALL_SLICES.items():
        device = tpu_devices(parse_topology(topology))[0]
        for length in lengths:
            vmem = kernel_vmem_bytes(compiled_hlo(device, length, jnp.dtype(dtype)))
            rows.append({"generation": generation, "length": length,
                         **{f"{name}_kib": size // KIB for name, size in sorted(vmem.items())}})
    return {"bench": "vmem", "kernel": "flash_attention (TPU, streamed K/V)", "mask": "prefix-LM",
            "batch": BATCH, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": dtype, "rows": rows}
