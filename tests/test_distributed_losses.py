"""Ring SigLIP and all-gather CLIP under shard_map on 8 devices equal the global losses (value, gradients),
and the ring never materialises the B x B logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vlm_jax.parallel.contrastive import gathered_softmax_loss, ring_sigmoid_loss
from vlm_jax.tasks.contrastive_losses import sigmoid_contrastive_loss, softmax_contrastive_loss

PAIRS = [(ring_sigmoid_loss, sigmoid_contrastive_loss), (gathered_softmax_loss, softmax_contrastive_loss)]


def mesh_of(shape, names):
    return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


def inputs(batch, width=16, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2, batch, width))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return jnp.asarray(z[0], jnp.float32), jnp.asarray(z[1], jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("distributed, reference", PAIRS)
@pytest.mark.parametrize("local_batch", [1, 3, 8])
@pytest.mark.parametrize("shape, axes", [((8,), ("data",)), ((2, 4), ("data", "fsdp"))])
def test_distributed_loss_equals_the_global_loss(distributed, reference, local_batch, shape, axes):
    mesh = mesh_of(shape, axes)
    zimg, ztxt = inputs(local_batch * 8, seed=local_batch)
    sharded = NamedSharding(mesh, PartitionSpec(axes))
    zimg_s, ztxt_s = jax.device_put(zimg, sharded), jax.device_put(ztxt, sharded)
    log_scale, bias = jnp.float32(math.log(10.0)), jnp.float32(-10.0)  # SigLIP's init
    if distributed is gathered_softmax_loss:
        log_scale = jnp.float32(math.log(1 / 0.07))
    ours = jax.jit(jax.value_and_grad(
        lambda a, b, s, c: distributed(mesh, axes, a, b, s, c), argnums=(0, 1, 2, 3)))
    plain = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))
    (value, grads), (expected, expected_grads) = ours(zimg_s, ztxt_s, log_scale, bias), plain(
        zimg, ztxt, log_scale, bias)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def temp_bytes(loss_fn, mesh, batch, width):
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    spec = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=sharded)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b, s, c: loss_fn(a, b, s, c), argnums=(0, 1)))
    return grad.lower(spec, spec, scalar, scalar).compile().memory_analysis().temp_size_in_bytes


def full_matrix_sigmoid_loss(mesh, zimg, ztxt, log_scale, bias):
    """The all-gathered full-matrix SigLIP (open_clip without --local-loss): every device gathers all
    embeddings and computes the global B x B loss."""
    def local(zimg_b, ztxt_b, log_scale, bias):
        all_img = jax.lax.all_gather(zimg_b, "data", tiled=True)
        all_txt = jax.lax.all_gather(ztxt_b, "data", tiled=True)
        return sigmoid_contrastive_loss(all_img, all_txt, log_scale, bias)
    batch = PartitionSpec("data")
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, PartitionSpec(), PartitionSpec()),
                         out_specs=PartitionSpec(), check_vma=False)(zimg, ztxt, log_scale, bias)


@pytest.mark.slow
def test_ring_temporaries_are_a_quarter_of_the_gathered_full_matrix():
    """Global batch 16,384, width 768, 8 devices: compiled temporary bytes of loss + gradient per device."""
    mesh = mesh_of((8,), ("data",))
    ring = temp_bytes(lambda a, b, s, c: ring_sigmoid_loss(mesh, ("data",), a, b, s, c), mesh, 16384, 768)
    full = temp_bytes(lambda a, b, s, c: full_matrix_sigmoid_loss(mesh, a, b, s, c), mesh, 16384, 768)
    print(f"ring {ring / 2**20:.1f} MiB, all-gathered full matrix {full / 2**20:.1f} MiB per device")
    assert ring <= full / 4
