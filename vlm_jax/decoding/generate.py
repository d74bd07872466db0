"""Greedy / sampled generation with a cache, and the greedy no-cache (recomputation) reference.

Shape key: B batch, V vocabulary, T generated tokens (max_new_tokens).

Jit with the model functions and the static settings closed over, e.g.
`jax.jit(functools.partial(generate, prefill, extend, max_new_tokens=32, eos_id=1, sampling=cfg))(inputs, rng=k)`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.decoding.protocol import Extend, Forward, Prefill
from vlm_jax.decoding.sampling import SamplingConfig, sample_tokens


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def generate(prefill: Prefill, extend: Extend, inputs: Any, *, max_new_tokens: int, eos_id: int, pad_id: int = 0,
             sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None) -> jax.Array:
    """Decodes up to `max_new_tokens` tokens per row: tokens_BxT (int32).

    A row stops at its first EOS (kept in the output) and emits `pad_id` after it. The loop is a
    `jax.lax.while_loop` that ends as soon as every row is done, so `extend` runs at most T - 1 times (the cache
    needs room for the prompt plus T - 1 tokens). `rng` is needed unless sampling is greedy; step t samples with
    `fold_in(rng, t)`.
    """
    check_positive("max_new_tokens", max_new_tokens)
    if not sampling.greedy and rng is None:
        raise ValueError(f"generate: sampling with temperature {sampling.temperature} needs an rng key")

    def pick(logits_BxV: jax.Array, step: jax.Array | int) -> jax.Array:
        return sample_tokens(logits_BxV, sampling, None if rng is None else jax.random.fold_in(rng, step))

    logits_BxV, cache = prefill(inputs)
    token_B = pick(logits_BxV, 0)
    tokens_BxT = jnp.full((token_B.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)

    def not_done(carry):
        step, _, done_B, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def step_fn(carry):
        step, tokens_BxT, done_B, last_B, cache = carry
        logits_BxV, cache = extend(cache, last_B)
        token_B = jnp.where(done_B, pad_id, pick(logits_BxV, step))
        return step + 1, tokens_BxT.at[:, step].set(token_B), done_B | (token_B == eos_id), token_B, cache

    carry = (jnp.asarray(1, jnp.int32), tokens_BxT, token_B == eos_id, token_B, cache)
    return jax.lax.while_loop(not_done, step_fn, carry)[1]


def decoder_from_forward(forward: Forward, *, bos_id: int, max_new_tokens: int) -> tuple[Prefill, Extend]:
    """`prefill` / `extend` that recompute everything with `forward` (no KV cache; O(T^2) work).

    The "cache" holds the inputs, the token prefix [BOS, y_0, .., y_{t-1}] padded to T tokens (one jit shape) and
    the 0-d index t; step t takes position t's logits, so `forward` must be causal and start from BOS (as the
    captioner's teacher forcing does). Works with `generate` and `beam_search` alike.
    """

    def prefill(inputs: Any) -> tuple[jax.Array, Any]:
        batch = jax.tree.leaves(inputs)[0].shape[0]
        prefix_BxT = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(bos_id)
        logits_BxV = forward(inputs, prefix_BxT)[:, 0].astype(jnp.float32)
        return logits_BxV, (inputs, prefix_BxT, jnp.asarray(0, jnp.int32))

    def extend(cache: Any, tokens_B: jax.Array) -> tuple[jax.Array, Any]:
        inputs, prefix_BxT, t = cache
        prefix_BxT = prefix_BxT.at[:, t + 1].set(tokens_B)
        logits_BxTxV = forward(inputs, prefix_BxT)
        logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, t + 1, axis=1, keepdims=False)
        return logits_BxV.astype(jnp.float32), (inputs, prefix_BxT, t + 1)

    return prefill, extend


def greedy_by_recomputation(forward: Forward, inputs: Any, *, bos_id: int, max_new_tokens: int, eos_id: int,
                            pad_id: int = 0) -> jax.Array:
    """Greedy decoding without a cache: the reference a cached decoder must equal token for token.

    Step t runs `forward(inputs, [BOS, y_0, .., y_{t-1}] padded to T tokens)` and takes position t's logits;
    `forward`'s first input token is BOS. Same stopping and padding as `generate`.
    """
    prefill, extend = decoder_from_forward(forward, bos_id=bos_id, max_new_tokens=max_new_tokens)
    return generate(prefill, extend, inputs, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
