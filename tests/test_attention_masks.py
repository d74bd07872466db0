"""The Gemma / PaliGemma attention features in every implementation that takes them, against the dense float32
reference (values and dq/dk/dv): packed prefix-LM with segment ids, a traced sliding window (with causal and
with prefix-LM masks), logit soft-capping, and all at once; under shard_map; and the one-line refusals of the
implementations that do not take them. Exact block ranges are in test_flash_attention.py, compiling for TPU in
test_tpu_compile.py."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType

from vlm_jax.kernels.attention import PALLAS_PLATFORM, choose, dot_product_attention
from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.sharded_attention import sharded_attention
from vlm_jax.parallel.sharding import activation_sharding

from attention_cases import FEATURES, feature_masks, packed_prefix_lm, random_inputs, reference, values_and_grads

LENGTH, WINDOW, TOLERANCE = 300, 100, 2e-5  # 3 TPU blocks of 128; the window skips whole blocks


def xla(q, k, v, mask, softcap):
    return dot_product_attention(q, k, v, mask=mask, softcap=softcap)


IMPLEMENTATIONS = {
    "xla": xla,
    "blockwise": functools.partial(blockwise_attention, block_size=64),
    # the resident-rows kernel where this backend runs it (interpret mode on CPU), blocks of 64
    "resident": functools.partial(flash_attention, platform=PALLAS_PLATFORM[jax.default_backend()], block=64),
    "tpu": functools.partial(flash_attention, platform="tpu"),  # the streamed kernel, under the TPU interpreter
}


def assert_close(got, want, name):
    for part, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"{name} {part}")


@pytest.mark.slow
@pytest.mark.parametrize("feature", FEATURES)
def test_every_implementation_matches_reference(feature):
    kind, softcap = FEATURES[feature]
    mask = feature_masks(2, LENGTH, WINDOW)[kind]
    q, k, v, cotangent = random_inputs(17, 2, LENGTH, LENGTH, heads=2, kv_heads=1, dim=16)
    visible = jnp.broadcast_to(mask.dense(LENGTH, LENGTH), (2, LENGTH, LENGTH))
    want = values_and_grads(functools.partial(reference, softcap=softcap), q, k, v, cotangent, visible)
    for name, attention in IMPLEMENTATIONS.items():
        with pltpu.force_tpu_interpret_mode() if name == "tpu" else contextlib.nullcontext():
            got = values_and_grads(functools.partial(attention, softcap=softcap), q, k, v, cotangent, mask)
        assert_close(got, want, name)


def test_sharded_kernel_with_every_feature():
    """Under a data x tensor mesh the Pallas kernel runs per device (batch and heads split) with a packed
    prefix-LM, a Python int window (replicated as a 0-d array) and a soft-cap, and equals the reference."""
    ids, ends = packed_prefix_lm(2, LENGTH)
    q, k, v, cotangent = random_inputs(19, 2, LENGTH, LENGTH, heads=4, kv_heads=2, dim=16)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    rules = (("activation_batch", "data"), ("heads", "tensor"))

    def attention(q, k, v, ids, ends):
        mask = MaskSpec(q_prefix_end_BxT=ends, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids, window=WINDOW)
        with activation_sharding(mesh, rules):
            return sharded_attention(q, k, v, mask, "pallas", softcap=2.0)

    got = values_and_grads(attention, q, k, v, cotangent, ids, ends)
    mask = MaskSpec(q_prefix_end_BxT=ends, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids, window=WINDOW)
    want = values_and_grads(functools.partial(reference, softcap=2.0), q, k, v, cotangent,
                            mask.dense(LENGTH, LENGTH))
    assert_close(got, want, "sharded pallas")


def test_refusals_are_one_line_and_auto_avoids_them():
    q, k = jnp.zeros((2, 5, 4, 8), jnp.bfloat16), jnp.zeros((2, 5, 2, 8), jnp.bfloat16)
    ids, ends = packed_prefix_lm(2, 5, examples=2)
    packed = MaskSpec(q_prefix_end_BxT=ends, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids)
    windowed = MaskSpec(causal=True, window=jnp.asarray(3))
    refused = [
        (dict(mask=packed, impl="splash", backend="tpu"), "'splash' has no per-example prefix-LM mask"),
        (dict(mask=windowed, impl="splash", backend="tpu"), "'splash' has no sliding window"),
        (dict(mask=packed, impl="cudnn", backend="gpu"), "cuDNN attention here takes full or causal masks only"),
        (dict(mask=windowed, impl="cudnn", backend="gpu"), "no prefix-LM, segment ids or sliding window"),
        (dict(mask=MaskSpec(causal=True), impl="cudnn", backend="gpu", softcap=50.0), "no logit soft-cap"),
        (dict(mask=MaskSpec(q_prefix_end_BxT=jnp.full((2, 5), 9))), "prefix end 9 is outside the sequence of 5"),
        (dict(mask=MaskSpec(q_prefix_end_BxT=jnp.zeros((2, 4), jnp.int32))), "prefix ends .* do not match"),
        (dict(mask=MaskSpec(window=jnp.ones((2,), jnp.int32))), "the attention window is a scalar"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message) as error:
            dot_product_attention(q, k, k, **kwargs)
        assert "\n" not in str(error.value), str(error.value)

    long_q, long_k = jnp.zeros((1, 4096, 4, 64), jnp.bfloat16), jnp.zeros((1, 4096, 2, 64), jnp.bfloat16)
    long_ids = jnp.ones((1, 4096), jnp.int32)
    assert choose("auto", long_q, long_k, MaskSpec(causal=True), False, "gpu") == "cudnn"
    for mask, softcap in [(MaskSpec(causal=True), 50.0), (MaskSpec(causal=True, window=jnp.asarray(512)), None),
                          (MaskSpec(q_prefix_end_BxT=long_ids), None)]:
        assert choose("auto", long_q, long_k, mask, False, "gpu", softcap) == "pallas"
