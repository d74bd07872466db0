"""The Pallas flash-attention kernels against the plain reference: every mask kind, lengths that are not block
multiples, grouped-query heads, float32 and bfloat16, values and dq/dk/dv; block skipping. The resident-rows
kernel runs in interpret mode on CPU and natively on a GPU backend (JAX_PLATFORMS=cuda); the streamed TPU
kernel under the TPU interpreter; splash in interpret mode; lowering for GPU (Triton). Compiling for TPU is in
test_tpu_compile.py."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention import PALLAS_PLATFORM
from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.flash_masks import build_block_mask
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.kernels.splash import splash_attention

from attention_cases import KINDS, LENGTHS, feature_masks, masks, random_inputs, reference, values_and_grads

F32_TOLERANCE, BF16_RELATIVE = 1e-5, 2e-2
# The resident-rows kernel where this backend runs it: interpret mode on CPU, Triton on GPU.
flash = functools.partial(flash_attention, platform=PALLAS_PLATFORM[jax.default_backend()])
tpu_flash = functools.partial(flash_attention, platform="tpu")


def compare(attention, mask, q, k, v, cotangent, dtype, softcap=None):
    """Values and dq/dk/dv of `attention(q, k, v, mask)` against the float32 reference on the same (rounded)
    inputs."""
    visible = jnp.broadcast_to(mask.dense(q.shape[1], k.shape[1]), (q.shape[0], q.shape[1], k.shape[1]))
    got = values_and_grads(attention, q, k, v, cotangent, mask)
    want = values_and_grads(functools.partial(reference, softcap=softcap), q, k, v, cotangent, visible)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if dtype == jnp.float32:
            np.testing.assert_allclose(a, b, atol=F32_TOLERANCE, rtol=F32_TOLERANCE, err_msg=name)
        else:
            # relative to the largest reference entry; a zero gradient (dq at length 1) is held to 2e-5 absolute
            relative = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-3))
            assert relative <= BF16_RELATIVE, f"{name}: relative error {relative:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_pallas_matches_reference(kind, length, dtype):
    q, k, v, cotangent = random_inputs(length, 2, length, length, heads=4, kv_heads=2, dim=16, dtype=dtype)
    mask = masks(2, length)[kind]
    compare(flash, mask, q, k, v, cotangent, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("length_q,length_k,kv_heads,kind", [
    (1, 197, 4, "full"),        # attention-pooling probe: one query over the image tokens
    (64, 300, 1, "causal"),     # multi-query, shorter queries than keys
    (197, 197, 4, "segments"),  # multi-head (no grouping)
])
def test_pallas_cross_attention_and_head_groupings(length_q, length_k, kv_heads, kind):
    q, k, v, cotangent = random_inputs(7, 2, length_q, length_k, heads=4, kv_heads=kv_heads, dim=32)
    mask = masks(2, length_k)[kind]
    if kind == "segments":
        mask = MaskSpec(q_segment_ids_BxT=mask.q_segment_ids_BxT[:, :length_q],
                        kv_segment_ids_BxS=mask.kv_segment_ids_BxS)
    compare(flash, mask, q, k, v, cotangent, jnp.float32)


@pytest.mark.parametrize("kind", KINDS + ["packed_prefix", "window_causal", "window_prefix", "packed_window",
                                          "narrow_window"])
def test_block_ranges_are_exactly_the_non_empty_blocks(kind):
    """The loop ranges visit every block holding a visible key and no other (contiguous masks), also with
    packed prefix-LM examples and sliding windows (a third of the sequence, or narrower than a block)."""
    batch, length, block = 2, 1025, 128
    cases = {**masks(batch, length), **feature_masks(batch, length),
             "narrow_window": feature_masks(batch, length, window=50)["packed_window"]}
    mask, padded = cases[kind], 1152
    blocks = build_block_mask(mask, batch, length, length, padded, padded, block, block)
    visible = jnp.pad(jnp.broadcast_to(mask.dense(length, length), (batch, length, length)),
                      ((0, 0), (0, padded - length), (0, padded - length)))
    non_empty = visible.reshape(batch, 9, block, 9, block).any((2, 4))
    lo, hi = blocks.kv_range_lo.reshape(batch, 9), blocks.kv_range_hi.reshape(batch, 9)
    visited = (jnp.arange(9)[None, None] >= lo[..., None]) & (jnp.arange(9)[None, None] < hi[..., None])
    np.testing.assert_array_equal(visited, non_empty)
    lo, hi = blocks.q_range_lo.reshape(batch, 9), blocks.q_range_hi.reshape(batch, 9)
    visited = (jnp.arange(9)[None, None] >= lo[..., None]) & (jnp.arange(9)[None, None] < hi[..., None])
    np.testing.assert_array_equal(visited, jnp.swapaxes(non_empty, 1, 2))
    if kind == "causal":
        assert int(visited.sum()) == batch * 45  # 45 of 81 block pairs: the upper triangle is never computed


@pytest.mark.parametrize("platform", ["resident", "tpu"])
def test_blocks_of_padding_are_never_loaded(platform):
    """NaN keys and values in blocks that hold only padding would poison the output if they were read."""
    length, pad_from = 729, 429                     # blocks of 128: 512..728 is padding only
    q, k, v, cotangent = random_inputs(3, 1, length, length, heads=2, kv_heads=2, dim=16)
    segments = jnp.where(jnp.arange(length) < pad_from, 1, 0)[None]
    mask = MaskSpec(q_segment_ids_BxT=segments, kv_segment_ids_BxS=segments)
    poisoned = jnp.where(jnp.arange(length)[None, :, None, None] >= 512, jnp.nan, 1.0)
    with pltpu.force_tpu_interpret_mode() if platform == "tpu" else contextlib.nullcontext():
        got = values_and_grads(tpu_flash if platform == "tpu" else flash, q, k * poisoned, v * poisoned,
                               cotangent, mask)
    want = values_and_grads(reference, q, k, v, cotangent, mask.dense(length, length))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a[:, :512], b[:, :512], atol=F32_TOLERANCE, rtol=F32_TOLERANCE)
    assert all(np.isfinite(np.asarray(x)).all() for x in got)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_streamed_tpu_kernel_in_tpu_interpret_mode(kind, dtype):
    """The TPU kernels (keys and values streamed over the innermost grid axis, online-softmax state and
    gradient accumulators in VMEM scratch, scalar-prefetched block ranges) under the TPU interpreter."""
    q, k, v, cotangent = random_inputs(11, 2, 197, 197, heads=4, kv_heads=2, dim=16, dtype=dtype)
    with pltpu.force_tpu_interpret_mode():
        compare(tpu_flash, masks(2, 197)[kind], q, k, v, cotangent, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("length,kind,kv_heads,dtype", [
    (1025, "causal", 1, jnp.float32),     # multi-query; 9 x 9 blocks of which 45 are visited
    (729, "prefix", 4, jnp.bfloat16),     # multi-head; prefix blocks visited in full, then causal
    (1025, "segments", 2, jnp.float32),   # packed sequences with padding: off-diagonal blocks skipped
])
def test_streamed_tpu_kernel_over_many_blocks(length, kind, kv_heads, dtype):
    q, k, v, cotangent = random_inputs(length, 2, length, length, heads=4, kv_heads=kv_heads, dim=16, dtype=dtype)
    with pltpu.force_tpu_interpret_mode():
        compare(tpu_flash, masks(2, length)[kind], q, k, v, cotangent, dtype)


@pytest.mark.parametrize("kind,kv_heads,softcap", [("full", 4, None), ("causal", 2, 2.0), ("segments", 1, None)])
def test_splash_in_interpret_mode(kind, kv_heads, softcap):
    q, k, v, cotangent = random_inputs(13, 2, 197, 197, heads=4, kv_heads=kv_heads, dim=16)
    mask = masks(2, 197)[kind]
    splash = functools.partial(splash_attention, softcap=softcap, interpret=True)
    compare(splash, mask, q, k, v, cotangent, jnp.float32, softcap)
    with pytest.raises(ValueError, match="no per-example prefix-LM"):
        splash_attention(q, k, v, masks(2, 197)["prefix"], interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_lower_for_gpu(dtype):
    """Forward, dq and dk/dv kernels lower to Triton (CUDA) from this CPU-only machine (compiling needs a GPU),
    with every mask feature (per-example and per-query prefixes, segment ids, a traced window) and a soft-cap."""
    q = jax.ShapeDtypeStruct((2, 197, 4, 64), dtype)
    kv = jax.ShapeDtypeStruct((2, 197, 2, 64), dtype)
    ids = jax.ShapeDtypeStruct((2, 197), jnp.int32)
    prefix = jax.ShapeDtypeStruct((2,), jnp.int32)
    window = jax.ShapeDtypeStruct((), jnp.int32)

    def grads(q, k, v, ids, prefix, window):
        mask = MaskSpec(causal=True, prefix_len_B=prefix, q_segment_ids_BxT=ids, kv_segment_ids_BxS=ids,
                        q_prefix_end_BxT=ids, window=window)
        attention = functools.partial(flash_attention, platform="gpu", softcap=50.0)
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask).astype(jnp.float32))
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    lowered = jax.jit(grads).trace(q, kv, kv, ids, prefix, window).lower(lowering_platforms=("cuda",))
    calls = [line for line in lowered.as_text().splitlines() if "custom_call" in line and "triton" in line]
    assert len(calls) == 3, calls  # forward, dq, dk/dv


def demo_losses(attention_impl: str, steps: int = 2) -> list[float]:
    """Losses of the `make demo` model (configs/demo/clip_tiny.py) at batch 16 on one device."""
    from configs.demo.clip_tiny import get_config
    from test_train_step import setup
    from vlm_jax.parallel.sharding import to_global_batch
    from vlm_jax.train_state import init_train_state

    config = get_config()
    config.batch_size, config.model.attention_impl = 16, attention_impl
    layout, sharding, step_fn = setup(config, jax.devices()[:1])
    state, losses, rng = init_train_state(layout, 0), [], np.random.default_rng(0)
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                 "text": rng.integers(0, 1000, (16, 16)).astype(np.int32)}
        state, metrics = step_fn(state, to_global_batch(batch, sharding))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
def test_demo_model_trains_the_same_with_the_pallas_kernel():
    np.testing.assert_allclose(demo_losses("pallas"), demo_losses("xla"), rtol=1e-5, atol=1e-5)


def test_dispatch_choices_and_refusals():
    from vlm_jax.kernels.attention import choose, dot_product_attention

    def shapes(length, dim=64, dtype=jnp.float32):
        return jnp.zeros((1, length, 4, dim), dtype), jnp.zeros((1, length, 2, dim), dtype)

    causal, prefix = MaskSpec(causal=True), MaskSpec(prefix_len_B=jnp.asarray([3]))
    segments = MaskSpec(q_segment_ids_BxT=jnp.ones((1, 4096), jnp.int32),
                        kv_segment_ids_BxS=jnp.ones((1, 4096), jnp.int32))
    assert choose("auto", *shapes(197), causal, False, "tpu") == "xla"          # short: XLA everywhere
    assert choose("auto", *shapes(4096), causal, True, "tpu") == "xla"          # a dense mask: only XLA
    assert choose("auto", *shapes(4096), causal, False, "cpu") == "blockwise"
    assert choose("auto", *shapes(4096), prefix, False, "tpu") == "pallas"
    assert choose("auto", *shapes(65536, 128), causal, False, "tpu") == "pallas"  # K/V stream: any length
    assert choose("auto", *shapes(65536, 128), prefix, False, "tpu") == "pallas"
    assert choose("auto", *shapes(4096, dtype=jnp.bfloat16), causal, False, "gpu") == "cudnn"
    assert choose("auto", *shapes(4096, dtype=jnp.bfloat16), segments, False, "gpu") == "pallas"
    assert choose("auto", *shapes(4096), causal, False, "gpu") == "pallas"      # float32: not cuDNN
    assert choose("pallas", *shapes(8), None, False, "cpu") == "pallas"

    q, k = shapes(5)
    with pytest.raises(ValueError, match="attention_impl 'splash' needs a tpu backend; this one is cpu"):
        dot_product_attention(q, k, k, impl="splash")
    with pytest.raises(ValueError, match="attention_impl 'cudnn' needs a gpu backend; this one is cpu"):
        dot_product_attention(q, k, k, impl="cudnn")
    with pytest.raises(ValueError, match="prefix length 9 is outside the sequence of 5 tokens"):
        dot_product_attention(q, k, k, mask=MaskSpec(prefix_len_B=jnp.asarray([9])), impl="pallas")
    with pytest.raises(ValueError, match="'pallas' takes a structured MaskSpec, not a dense mask"):
        dot_product_attention(q, k, k, mask_BxTxS=jnp.ones((1, 5, 5), bool), impl="pallas")


@pytest.mark.slow
def test_sharded_kernel_step_matches_one_device():
    """On a data x fsdp x tensor mesh the kernel runs per device under shard_map (batch and heads split) and
    the losses equal the single-device XLA ones."""
    from test_train_step import assert_same_history, run_steps, tiny_config
    sharded = tiny_config(data=2, fsdp=2, tensor=2)
    sharded.model.attention_impl = "pallas"
    single = tiny_config()
    single.model.attention_impl = "xla"
    assert_same_history(run_steps(sharded, jax.devices(), steps=2), run_steps(single, jax.devices()[:1], steps=2),
                        rtol=1e-5, atol=1e-5)
