"""Attention dispatch: every attention layer of every model calls `dot_product_attention`.

Implementations: "xla" (einsum + softmax, T x S logits), "blockwise" (scan over key blocks with an online
softmax, linear memory; blockwise.py), "pallas" (our fused kernel; flash_attention.py: Mosaic on TPU, Triton
on GPU, interpret mode on CPU), "splash" (jax's TPU kernel; splash.py), "cudnn" (`jax.nn.dot_product_attention`
with cuDNN) and "auto", which picks one from the backend, the lengths, the dtype and the mask when the layer is
traced. The backend is that of the devices the program is compiled for (the mesh's, passed in by
`parallel/sharded_attention.py`), so an ahead-of-time compile for TPU from a CPU host embeds the Mosaic
kernel. Masks are structured (`MaskSpec`: causal, prefix-LM, packed prefix-LM, segment ids, sliding window) so
every implementation can evaluate them per block; "xla" also takes a dense boolean mask. An optional logit
soft-cap (Gemma 2) is applied before masking; cuDNN refuses it, splash refuses prefix-LM masks and windows.

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.kernels.blockwise import blockwise_attention
from vlm_jax.kernels.flash_attention import flash_attention
from vlm_jax.kernels.flash_masks import check_prefix
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.kernels.splash import splash_attention

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas", "splash", "cudnn")
BACKENDS = {"splash": ("tpu",), "cudnn": ("gpu",)}
SHORT_SEQUENCE = 1024  # "auto": up to this many keys the plain XLA path is as good as any kernel
PALLAS_PLATFORM = {"tpu": "tpu", "gpu": "gpu", "cpu": "interpret"}  # backend -> where the Pallas kernel runs


def check_backend(impl: str, backend: str | None = None) -> None:
    """One-line error for an implementation this backend cannot run."""
    backend = backend or jax.default_backend()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose from {IMPLEMENTATIONS}")
    if impl in BACKENDS and backend not in BACKENDS[impl]:
        raise ValueError(f"attention_impl {impl!r} needs a {' or '.join(BACKENDS[impl])} backend; this one is "
                         f"{backend}")


def native_implementations(backend: str) -> tuple[str, ...]:
    """The implementations this backend runs compiled (on CPU the Pallas kernel only runs interpreted)."""
    return tuple(impl for impl in IMPLEMENTATIONS if impl != "auto" and backend in BACKENDS.get(impl, (backend,))
                 and not (impl == "pallas" and PALLAS_PLATFORM[backend] == "interpret"))


def _cudnn_refusal(q: jax.Array, mask: MaskSpec | None, softcap: float | None = None) -> str | None:
    """Why cuDNN cannot take this call, or None."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention takes bfloat16 or float16, not {q.dtype}"
    if mask is not None and any(x is not None for x in (
            mask.prefix_len_B, mask.q_prefix_end_BxT, mask.q_segment_ids_BxT, mask.window)):
        return ("cuDNN attention here takes full or causal masks only (no prefix-LM, segment ids or sliding "
                "window)")
    if softcap is not None:
        return "cuDNN attention here has no logit soft-cap"
    return None


def choose(impl: str, q: jax.Array, k: jax.Array, mask: MaskSpec | None, dense_mask: bool,
           backend: str | None = None, softcap: float | None = None) -> str:
    """The implementation a layer runs: `impl` itself, or what "auto" picks for these shapes on `backend`
    (default: jax's default backend); "auto" never picks one that refuses the call. Every choice compiles for
    its backend (tests/test_tpu_compile.py)."""
    backend = backend or jax.default_backend()
    check_backend(impl, backend)
    if impl != "auto":
        return impl
    if dense_mask or k.shape[1] <= SHORT_SEQUENCE:
        return "xla"
    if backend == "tpu":  # keys and values stream through VMEM: every mask, any length
        return "pallas"
    if backend == "gpu":
        return "pallas" if _cudnn_refusal(q, mask, softcap) else "cudnn"
    return "blockwise"


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(want [B, T, H, D], [B, S, K, D], [B, S, K, D])")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if mask is not None and mask.q_segment_ids_BxT is not None:
        if mask.q_segment_ids_BxT.shape != q.shape[:2] or mask.kv_segment_ids_BxS.shape != k.shape[:2]:
            raise ValueError(f"segment ids {mask.q_segment_ids_BxT.shape} / {mask.kv_segment_ids_BxS.shape} do "
                             f"not match query {q.shape[:2]} / key {k.shape[:2]} lengths")
    if mask is not None and mask.q_prefix_end_BxT is not None and mask.q_prefix_end_BxT.shape != q.shape[:2]:
        raise ValueError(f"prefix ends {mask.q_prefix_end_BxT.shape} do not match the queries {q.shape[:2]}")
    if mask is not None and mask.window is not None and jnp.ndim(mask.window):
        raise ValueError(f"the attention window is a scalar, not an array of shape {jnp.shape(mask.window)}")


def dot_product_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    mask_BxTxS: jax.Array | None = None,
    mask: MaskSpec | None = None,
    impl: str = "xla",
    backend: str | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Softmax attention with float32 logits, soft-capped to softcap * tanh(logits / softcap) when `softcap`
    is set; returns [B, T, H, D] in the dtype of `q`. `backend` is the platform the program is compiled for
    (default: jax's default backend)."""
    _check_shapes(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)
    if mask is not None:
        check_prefix(mask, k_BxSxKxD.shape[1])
    backend = backend or jax.default_backend()
    impl = choose(impl, q_BxTxHxD, k_BxSxKxD, mask, mask_BxTxS is not None, backend, softcap)
    if impl == "xla":
        return _xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, mask, softcap)
    if mask_BxTxS is not None:
        raise ValueError(f"attention_impl {impl!r} takes a structured MaskSpec, not a dense mask")
    mask = mask or MaskSpec()
    if impl == "blockwise":
        return blockwise_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, softcap=softcap)
    if impl == "pallas":
        return flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, platform=PALLAS_PLATFORM[backend],
                               softcap=softcap)
    if impl == "splash":
        return splash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, softcap=softcap)
    refusal = _cudnn_refusal(q_BxTxHxD, mask, softcap)
    if refusal:
        raise ValueError(refusal)
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, is_causal=mask.causal,
                                        implementation="cudnn")


@jax.custom_vjp
def softmax_values(logits_BxHxTxS: jax.Array, v_BxHxSxD: jax.Array) -> jax.Array:
    """softmax(logits) @ v, the probabilities in v's dtype. The backward pass keeps only those probabilities
    and the output (no float32 T x S softmax), as flash attention does: dlogits = P * (dP - rowsum(dO * O))."""
    return _softmax_values_forward(logits_BxHxTxS, v_BxHxSxD)[0]


def _softmax_values_forward(logits_BxHxTxS, v_BxHxSxD):
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxHxSxD.dtype)
    out_BxHxTxD = jnp.einsum("bhts,bhsd->bhtd", probs_BxHxTxS, v_BxHxSxD)
    return out_BxHxTxD, (probs_BxHxTxS, v_BxHxSxD, out_BxHxTxD)


def _softmax_values_backward(residuals, d_out_BxHxTxD):
    probs_BxHxTxS, v_BxHxSxD, out_BxHxTxD = residuals
    d_probs_BxHxTxS = jnp.einsum("bhtd,bhsd->bhts", d_out_BxHxTxD, v_BxHxSxD, preferred_element_type=jnp.float32)
    row_BxHxTx1 = jnp.sum(d_out_BxHxTxD.astype(jnp.float32) * out_BxHxTxD.astype(jnp.float32), -1, keepdims=True)
    d_logits_BxHxTxS = probs_BxHxTxS.astype(jnp.float32) * (d_probs_BxHxTxS - row_BxHxTx1)
    d_v_BxHxSxD = jnp.einsum("bhts,bhtd->bhsd", probs_BxHxTxS, d_out_BxHxTxD)
    return d_logits_BxHxTxS, d_v_BxHxSxD


softmax_values.defvjp(_softmax_values_forward, _softmax_values_backward)


def _xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, mask, softcap):
    """Plain attention: kv heads repeated, T x S float32 logits (soft-capped if asked), softmax.

    Heads move next to the batch first ([B, H, T, D]), so both products are plain batched matrix products; with
    the heads between the token axes XLA:CPU ran them 1.5x slower, fwd + bwd (BENCH-S, DESIGN.md). The scale
    goes on q (T x D values) rather than on the T x S logits."""
    groups = q_BxTxHxD.shape[2] // k_BxSxKxD.shape[2]
    if mask is not None:
        dense = mask.dense(q_BxTxHxD.shape[1], k_BxSxKxD.shape[1])
        mask_BxTxS = dense if mask_BxTxS is None else mask_BxTxS & dense
    scale = q_BxTxHxD.shape[-1] ** -0.5
    q_BxHxTxD = jnp.swapaxes(q_BxTxHxD * jnp.asarray(scale, q_BxTxHxD.dtype), 1, 2)
    k_BxHxSxD = jnp.repeat(jnp.swapaxes(k_BxSxKxD, 1, 2), groups, axis=1)
    v_BxHxSxD = jnp.repeat(jnp.swapaxes(v_BxSxKxD, 1, 2), groups, axis=1)
    logits_BxHxTxS = jnp.einsum("bhtd,bhsd->bhts", q_BxHxTxD, k_BxHxSxD, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits_BxHxTxS = softcap * jnp.tanh(logits_BxHxTxS / softcap)
    if mask_BxTxS is not None:
        logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    out_BxHxTxD = softmax_values(logits_BxHxTxS, v_BxHxSxD)
    if mask_BxTxS is not None:  # rows with no visible key give zeros, as in every other implementation
        out_BxHxTxD = jnp.where(mask_BxTxS.any(-1)[:, None, :, None], out_BxHxTxD, 0).astype(out_BxHxTxD.dtype)
    return jnp.swapaxes(out_BxHxTxD, 1, 2)