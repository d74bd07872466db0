"""The real TPU compiler (libtpu, Mosaic included) on every attention kernel and on `auto`'s choices, for v5e,
v5p and v6e, from this CPU-only machine: compiled, not just lowered. The train steps are in
test_tpu_train_steps.py."""

import jax
import jax.numpy as jnp
import pytest

from vlm_jax.bench_vmem import kernel_vmem_bytes
from vlm_jax.kernels.attention import choose, dot_product_attention
from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.splash import splash_attention

from attention_cases import KINDS, feature_masks, masks
from tpu_targets import GENERATIONS, mosaic_kernels, on_one_chip

BATCH, HEADS, DIM = 2, 8, 64
HEAD_LAYOUTS = {"mha": 8, "gqa": 2}  # key/value heads for 8 query heads


def inputs(length: int, kv_heads: int, dtype, kind: str):
    """Abstract q, k, v and mask; `kind` is one of KINDS or of attention_cases.feature_masks (whose window is
    then a traced 0-d array)."""
    q = jax.ShapeDtypeStruct((BATCH, length, HEADS, DIM), dtype)
    kv = jax.ShapeDtypeStruct((BATCH, length, kv_heads, DIM), dtype)
    mask = {**masks(BATCH, length), **feature_masks(BATCH, length)}[kind]
    return q, kv, kv, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mask)


def forward_and_backward(attention):
    """(out, (dq, dk, dv)) of `attention(q, k, v, mask)`: the forward kernel and both backward kernels."""
    def program(q, k, v, mask):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
        return out, vjp(out)
    return program


def compile_on(generation: str, program, *args):
    return jax.jit(program).lower(*on_one_chip(generation, args)).compile()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("length", [197, 729, 1025, 4096])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_flash_kernel_compiles_for_every_mask_and_head_layout(generation, length, dtype):
    """One program per case holds forward, dq and dk/dv of every mask kind with multi-head and grouped-query
    heads; all 24 Mosaic kernels must compile. (bfloat16 failed here before the kernels stopped asking Mosaic
    for a float32 contract precision on bfloat16 operands.)"""
    flash = forward_and_backward(lambda q, k, v, mask: flash_attention(q, k, v, mask, platform="tpu"))
    cases = {(kind, layout): inputs(length, kv_heads, dtype, kind)
             for kind in KINDS for layout, kv_heads in HEAD_LAYOUTS.items()}
    compiled = compile_on(generation, lambda cases: {name: flash(*case) for name, case in cases.items()}, cases)
    assert mosaic_kernels(compiled) == 3 * len(cases)


@pytest.mark.parametrize("length", [16_384, 32_768])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_long_prefix_lm_gqa_streams_in_bfloat16(generation, length):
    """Keys and values stream through VMEM, so a prefix-LM mask with grouped-query heads compiles at any length
    in a VMEM that does not grow with it."""
    flash = forward_and_backward(lambda q, k, v, mask: flash_attention(q, k, v, mask, platform="tpu"))
    compiled = compile_on(generation, flash, *inputs(length, 2, jnp.bfloat16, "prefix"))
    vmem = kernel_vmem_bytes(compiled.as_text())  # what the compiler gave each kernel
    assert set(vmem) == {"flash_forward", "flash_dq", "flash_dkv"}
    assert max(vmem.values()) < 2**20, vmem  # a few tiles, not one head's keys and values (8 MiB at 32k)


@pytest.mark.slow
@pytest.mark.parametrize("generation", GENERATIONS)
def test_splash_and_blockwise_compile(generation):
    splash = forward_and_backward(splash_attention)
    blockwise = forward_and_backward(blockwise_attention)
    cases = {(kind, layout): inputs(1025, kv_heads, jnp.bfloat16, kind)
             for kind in ("full", "causal", "segments") for layout, kv_heads in HEAD_LAYOUTS.items()}
    compiled = compile_on(generation, lambda cases: {name: splash(*case) for name, case in cases.items()}, cases)
    assert mosaic_kernels(compiled) >= len(cases)
    compiled = compile_on(generation, blockwise, *inputs(1025, 2, jnp.bfloat16, "prefix"))
    assert mosaic_kernels(compiled) == 0


def test_gemma_features_compile_in_bfloat16():
    """Forward, dq and dk/dv of the Pallas kernel with packed prefix-LM examples (segment ids and per-query
    prefix ends), a traced sliding window and a logit soft-cap, with grouped-query heads in bfloat16; and splash
    with a soft-cap. One generation: the features add no new kind of Mosaic operation per generation."""
    flash = forward_and_backward(lambda q, k, v, mask: flash_attention(q, k, v, mask, platform="tpu", softcap=50.0))
    splash = forward_and_backward(lambda q, k, v, mask: splash_attention(q, k, v, mask, softcap=50.0))
    compiled = compile_on("v5e", lambda gemma, causal: (flash(*gemma), splash(*causal)),
                          inputs(1025, 2, jnp.bfloat16, "packed_window"), inputs(1025, 2, jnp.bfloat16, "causal"))
    assert mosaic_kernels(compiled) == 3 + 3  # ours: forward, dq, dk/dv; splash: forward, dq, dk/dv


# (keys, mask kind, dtype, dense mask): every mask kind and dtype just past the short-sequence limit and at 8k
# (pallas), and the XLA cases (at the limit; a dense mask).
CHOICE_CASES = ([(length, kind, dtype, False) for length in (1025, 8192) for kind in ("none", *KINDS)
                 for dtype in (jnp.float32, jnp.bfloat16)]
                + [(1024, "causal", jnp.bfloat16, False), (1025, "full", jnp.float32, True)])


@pytest.mark.slow
@pytest.mark.parametrize("generation", GENERATIONS)
def test_auto_picks_only_what_compiles_on_tpu(generation):
    """`auto` on the TPU backend compiles forward + backward in every case, and the compiled program holds
    the Mosaic kernels exactly when the choice is `pallas`."""
    for length, kind, dtype, dense in CHOICE_CASES:
        q, k, v, mask = inputs(length, 2, dtype, "full" if kind == "none" else kind)
        mask = None if kind == "none" else mask
        dense_mask = jax.ShapeDtypeStruct((BATCH, length, length), jnp.bool_) if dense else None
        chosen = choose("auto", q, k, mask, dense, backend="tpu")
        assert chosen == ("xla" if dense or length <= 1024 else "pallas"), (length, kind, dtype, dense)

        def attention(q, k, v, masks):
            mask, dense_mask = masks
            return dot_product_attention(q, k, v, mask=mask, mask_BxTxS=dense_mask, impl="auto", backend="tpu")

        compiled = compile_on(generation, forward_and_backward(attention), q, k, v, (mask, dense_mask))
        assert mosaic_kernels(compiled) == (3 if chosen == "pallas" else 0), (length, kind, dtype, dense)
