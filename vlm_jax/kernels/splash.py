"""jax's TPU splash attention kernel behind the `MaskSpec` interface, with padding to its block size.

Splash takes one example of [H, T, D] with T and S multiples of its block, a static mask shared by the batch
(full or causal here), segment ids and a logit soft-cap. Lengths such as 197 are padded; padded and segment-0
keys get a segment id no query has, and rows that see no key are zeroed afterwards. Per-example prefix-LM masks
and sliding windows (traced per layer) are not static, so they are refused (the Pallas kernel in
flash_attention.py handles them).

Shape key: B batch, T query length, S key length, H query heads, K key/value heads (H = K x G), D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlm_jax.kernels.masks import MaskSpec, unmatchable_padding
from vlm_jax.kernels.padding import pad_to, round_up

BLOCK = 128
_PADDING_KEY, _PADDING_QUERY = -1, -2  # padded positions: ids that match nothing


@functools.lru_cache(maxsize=64)
def _kernel(padded_q: int, padded_k: int, heads: int, multi_query: bool, causal: bool, softcap: float | None,
            interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    shape = (padded_q, padded_k)
    one_head = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    make = splash.make_splash_mqa if multi_query else splash.make_splash_mha
    with jax.ensure_compile_time_eval():  # the cached block tables must be constants, not tracers of one trace
        return make(mask=splash_mask.MultiHeadMask([one_head] * heads), head_shards=1, q_seq_shards=1,
                    block_sizes=splash.BlockSizes.get_default(), attn_logits_soft_cap=softcap, interpret=interpret)


def _segment_ids(mask: MaskSpec, batch: int, length_q: int, length_k: int, padded_q: int, padded_k: int):
    if mask.q_segment_ids_BxT is None:
        q_ids = jnp.ones((batch, length_q), jnp.int32)
        kv_ids = jnp.ones((batch, length_k), jnp.int32)
    else:
        q_ids = mask.q_segment_ids_BxT.astype(jnp.int32)
        kv_ids = unmatchable_padding(mask.kv_segment_ids_BxS)
    return pad_to(q_ids, {1: padded_q}, _PADDING_QUERY), pad_to(kv_ids, {1: padded_k}, _PADDING_KEY)


def splash_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask: MaskSpec,
                     *, softcap: float | None = None, interpret: bool = False) -> jax.Array:
    """Attention through the splash kernel, logits soft-capped when `softcap` is set; returns [B, T, H, D] in
    q's dtype."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    if mask.prefix_len_B is not None or mask.q_prefix_end_BxT is not None:
        raise ValueError("attention_impl 'splash' has no per-example prefix-LM mask; use 'pallas'")
    if mask.window is not None:
        raise ValueError("attention_impl 'splash' has no sliding window (a traced window is no static splash "
                         "mask); use 'pallas'")
    batch, length_q, heads, dim = q_BxTxHxD.shape
    length_k, kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    padded_q, padded_k = round_up(length_q, BLOCK), round_up(length_k, BLOCK)
    q = pad_to(q_BxTxHxD * jnp.asarray(dim ** -0.5, q_BxTxHxD.dtype), {1: padded_q})
    k, v = (pad_to(x, {1: padded_k}) for x in (k_BxSxKxD, v_BxSxKxD))
    q_ids, kv_ids = _segment_ids(mask, batch, length_q, length_k, padded_q, padded_k)
    groups = heads // kv_heads
    kernel = _kernel(padded_q, padded_k, groups if groups > 1 else heads, groups > 1, mask.causal, softcap,
                     interpret)

    def one_example(q_TxHxD, k_SxKxD, v_SxKxD, q_ids_T, kv_ids_S):
        segments = splash.SegmentIds(q_ids_T, kv_ids_S)
        if groups == 1:
            out_HxTxD = kernel(q_TxHxD.swapaxes(0, 1), k_SxKxD.swapaxes(0, 1), v_SxKxD.swapaxes(0, 1),
                               segment_ids=segments)
            return out_HxTxD.swapaxes(0, 1)
        q_KxGxTxD = q_TxHxD.reshape(-1, kv_heads, groups, dim).transpose(1, 2, 0, 3)
        per_kv_head = jax.vmap(lambda q_GxTxD, k_SxD, v_SxD: kernel(q_GxTxD, k_SxD, v_SxD, segment_ids=segments))
        out_KxGxTxD = per_kv_head(q_KxGxTxD, k_SxKxD.swapaxes(0, 1), v_SxKxD.swapaxes(0, 1))
        return out_KxGxTxD.transpose(2, 0, 1, 3).reshape(-1, heads, dim)

    out_BxTxHxD = jax.vmap(one_example)(q, k, v, q_ids, kv_ids)[:, :length_q]
    sees_a_key = (q_ids[:, :length_q] > 0)[:, :, None, None] if mask.q_segment_ids_BxT is not None else True
    return jnp.where(sees_a_key, out_BxTxHxD, 0).astype(q_BxTxHxD.dtype)
