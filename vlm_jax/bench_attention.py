"""The attention benchmark (`python -m vlm_jax.bench attention`): forward + backward time and compiled
temporary memory of each implementation available on this backend, at several sequence lengths."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from vlm_jax.kernels.attention import dot_product_attention, native_implementations
from vlm_jax.kernels.masks import MaskSpec

HEADS, HEAD_DIM = 8, 64
RUN_BUDGET_BYTES = 8 * 2**30
MASKS = ("full", "causal", "prefix")  # prefix: prefix-LM over the first half of the sequence


def make_mask(kind: str, length: int) -> MaskSpec:
    if kind == "prefix":
        return MaskSpec(prefix_len_B=jnp.asarray([length // 2], jnp.int32))
    return MaskSpec(causal=kind == "causal")


def measure(impl: str, length: int, mask_kind: str, dtype: str = "float32", repeats: int = 3) -> dict:
    shape = (1, length, HEADS, HEAD_DIM)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
    mask = make_mask(mask_kind, length)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, mask=mask, impl=impl).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    forward = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, impl=impl))
    temp = {name: fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("forward", forward), ("forward_backward", grad))}
    milliseconds = None  # not run when the temporaries would not fit this host's memory budget
    if temp["forward_backward"] <= RUN_BUDGET_BYTES:
        jax.block_until_ready(grad(q, k, v))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(grad(q, k, v))
        milliseconds = round((time.perf_counter() - start) / repeats * 1e3, 1)
    return {"impl": impl, "length": length, "mask": mask_kind, "fwd_bwd_ms": milliseconds,
            "forward_temp_mib": round(temp["forward"] / 2**20, 1),
            "fwd_bwd_temp_mib": round(temp["forward_backward"] / 2**20, 1)}


def bench_attention(lengths: list[int], mask_kind: str, dtype: str | None = None) -> dict:
    """Rows of time and compiled memory; `dtype` defaults to float32 on CPU and bfloat16 on accelerators.
    Implementations that cannot take the mask (cuDNN and splash with prefix-LM) are left out."""
    backend = jax.default_backend()
    dtype = dtype or ("float32" if backend == "cpu" else "bfloat16")
    takes_mask = {"cudnn": mask_kind != "prefix", "splash": mask_kind != "prefix"}
    rows = [measure(impl, length, mask_kind, dtype) for length in lengths
            for impl in native_implementations(backend) if takes_mask.get(impl, True)]
    return {"bench": "attention", "backend": backend, "dtype": dtype, "heads": HEADS, "head_dim": HEAD_DIM,
            "batch": 1, "rows": rows}
