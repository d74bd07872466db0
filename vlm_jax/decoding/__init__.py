"""Decoding for every generative model: samplers, cached generation, beam search, the no-cache reference.

A model is driven through pure functions (see `protocol.py`): `prefill(inputs) -> (logits_BxV, cache)` and
`extend(cache, tokens_B) -> (logits_BxV, cache)`, or, without a cache, `forward(inputs, tokens_BxT)`.
"""

from vlm_jax.decoding.beam_search import beam_search, length_divisor
from vlm_jax.decoding.cache_ops import gather_beams, repeat_rows
from vlm_jax.decoding.generate import decoder_from_forward, generate, greedy_by_recomputation
from vlm_jax.decoding.protocol import Extend, Forward, Prefill
from vlm_jax.decoding.sampling import SamplingConfig, filter_logits, sample_tokens, top_k_filter, top_p_filter

__all__ = [
    "Extend", "Forward", "Prefill", "SamplingConfig", "beam_search", "decoder_from_forward", "filter_logits",
    "gather_beams", "generate", "greedy_by_recomputation", "length_divisor", "repeat_rows", "sample_tokens",
    "top_k_filter", "top_p_filter",
]
