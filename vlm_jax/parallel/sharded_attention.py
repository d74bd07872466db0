"""Attention under the mesh: fused kernels run per device inside `shard_map`.

GSPMD cannot split a Pallas, splash or cuDNN custom call, so left to itself it would gather the whole batch
onto every device. Here the batch is split as the activations are (`activation_batch`) and the heads as the
projections are (`heads`), and each device runs the kernel on its own slice; the XLA and blockwise paths stay
with GSPMD. Keys are never split along the sequence (an axis sharded there is gathered first). The kernel
and `auto`'s choice follow the platform of the mesh's devices, not the host's default backend, so a step
compiled ahead of time for TPU devices from a CPU host carries the Mosaic kernel.

Shape key: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vlm_jax.kernels.attention import choose, dot_product_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.sharding import active_mesh, logical_to_mesh_spec

KERNELS = ("pallas", "splash", "cudnn")  # custom calls GSPMD cannot partition


def _axes_dividing(mesh, entry, size: int):
    """`entry` (a mesh axis or tuple of axes, or None) if their product divides `size`, else None."""
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return entry if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


def sharded_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                      mask: MaskSpec | None, impl: str, softcap: float | None = None) -> jax.Array:
    """`dot_product_attention`, with kernels split over batch and heads of the active mesh."""
    active = active_mesh()
    backend = active[0].devices.flat[0].platform if active else jax.default_backend()
    impl = choose(impl, q_BxTxHxD, k_BxSxKxD, mask, dense_mask=False, backend=backend, softcap=softcap)
    if impl not in KERNELS or active is None:
        return dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, impl=impl, backend=backend,
                                     softcap=softcap)
    mesh, rules = active
    batch = _axes_dividing(mesh, logical_to_mesh_spec(("activation_batch",), rules, mesh)[0], q_BxTxHxD.shape[0])
    heads = _axes_dividing(mesh, logical_to_mesh_spec(("heads",), rules, mesh)[0], k_BxSxKxD.shape[2])
    qkv = PartitionSpec(batch, None, heads, None)
    mask = jax.tree.map(jnp.asarray, mask or MaskSpec())  # a Python int window becomes a 0-d array
    # per-example arrays split with the batch; the window (0-d) is replicated
    mask_specs = jax.tree.map(lambda x: PartitionSpec(batch, *[None] * (x.ndim - 1)) if x.ndim else PartitionSpec(),
                              mask)

    def per_device(q, k, v, local_mask):
        return dot_product_attention(q, k, v, mask=local_mask, impl=impl, backend=backend, softcap=softcap)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(qkv, qkv, qkv, mask_specs), out_specs=qkv,
                         check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)
