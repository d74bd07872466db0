"""Beam search with GNMT length normalisation; returns the best hypothesis of each row.

Shape key: B batch, K beams, V vocabulary, T generated tokens (max_new_tokens), C candidates per step (2K).

A hypothesis ends at EOS (counted in its length) or at T tokens; its score is
sum(log p) / length_divisor(length, alpha) with the divisor ((5 + length) / 6) ** alpha (Wu et al. 2016, as
in Flax's T5 decoding); alpha is `beam_search`'s `length_penalty`. Live beams (no EOS yet) and finished
hypotheses are kept apart, K of each.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax.decoding.cache_ops import gather_beams, repeat_rows
from vlm_jax.decoding.generate import check_positive
from vlm_jax.decoding.protocol import Extend, Prefill

NEG_INF = -jnp.inf


def length_divisor(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT's divisor ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class Beams(NamedTuple):
    live_seqs_BxKxT: jax.Array  # int32, pad after the tokens so far
    live_logp_BxK: jax.Array  # summed log-probs; -inf for empty slots
    finished_seqs_BxKxT: jax.Array
    finished_score_BxK: jax.Array  # length-normalised; best first; -inf for empty slots
    done_B: jax.Array  # no live beam can beat the best finished hypothesis any more


def _search_step(beams: Beams, logits_BKxV: jax.Array, step: jax.Array | int, *, eos_id: int, alpha: float
                 ) -> tuple[Beams, jax.Array, jax.Array]:
    """Extends every live beam by every token and keeps the K best; returns (beams, parent_BxK, token_BxK)."""
    batch, beam_size, max_len = beams.live_seqs_BxKxT.shape
    vocab = logits_BKxV.shape[-1]
    logp_BxKxV = jax.nn.log_softmax(logits_BKxV.astype(jnp.float32), axis=-1).reshape(batch, beam_size, vocab)
    logp_BxKxV = logp_BxKxV + beams.live_logp_BxK[..., None]
    # 2K candidates hold at least K that do not end in EOS (each beam has one EOS extension).
    cand_logp_BxC, flat_BxC = jax.lax.top_k(logp_BxKxV.reshape(batch, -1), min(2 * beam_size, beam_size * vocab))
    parent_BxC, token_BxC = flat_BxC // vocab, flat_BxC % vocab
    seqs_BxCxT = jnp.take_along_axis(beams.live_seqs_BxKxT, parent_BxC[..., None], axis=1)
    seqs_BxCxT = seqs_BxCxT.at[:, :, step].set(token_BxC)
    is_eos_BxC = token_BxC == eos_id

    # A hypothesis finishes if it is among the step's K best and ends in EOS, or the step is the last one.
    in_top_k_C = jnp.arange(cand_logp_BxC.shape[1]) < beam_size
    finishing_BxC = (is_eos_BxC | (step == max_len - 1)) & in_top_k_C & (cand_logp_BxC > NEG_INF)
    cand_score_BxC = jnp.where(finishing_BxC, cand_logp_BxC / length_divisor(step + 1, alpha), NEG_INF)
    finished_score_BxK, pick_BxK = jax.lax.top_k(  # earlier hypotheses come first: they win ties
        jnp.concatenate([beams.finished_score_BxK, cand_score_BxC], axis=1), beam_size)
    finished_seqs_BxKxT = jnp.take_along_axis(
        jnp.concatenate([beams.finished_seqs_BxKxT, seqs_BxCxT], axis=1), pick_BxK[..., None], axis=1)

    live_logp_BxK, pick_BxK = jax.lax.top_k(jnp.where(is_eos_BxC, NEG_INF, cand_logp_BxC), beam_size)
    live_seqs_BxKxT = jnp.take_along_axis(seqs_BxCxT, pick_BxK[..., None], axis=1)

    # Log-probs only fall as a beam grows and its divisor is at most max(lp(step + 2), lp(T)), which bounds
    # the score any live beam can still reach.
    best_divisor = jnp.maximum(length_divisor(step + 2, alpha), length_divisor(max_len, alpha))
    beaten_B = finished_score_BxK[:, 0] >= live_logp_BxK[:, 0] / best_divisor
    done_B = beams.done_B | beaten_B | (step == max_len - 1)
    new = Beams(live_seqs_BxKxT, live_logp_BxK, finished_seqs_BxKxT, finished_score_BxK, done_B)
    return new, jnp.take_along_axis(parent_BxC, pick_BxK, axis=1), jnp.take_along_axis(token_BxC, pick_BxK, axis=1)


def beam_search(prefill: Prefill, extend: Extend, inputs: Any, *, beam_size: int, max_new_tokens: int,
                eos_id: int, pad_id: int = 0, length_penalty: float = 0.6) -> jax.Array:
    """The best hypothesis of each row, tokens_BxT (int32; EOS kept, `pad_id` after it).

    Prefills once per row, then repeats the cache to the beams and reorders it with gathers after every step.
    Stops when every row is done: no live beam can beat its best finished hypothesis (exact, so a beam size
    that holds every prefix gives the exhaustive optimum) or T tokens were made. `length_penalty` is GNMT's
    alpha; with 0 the score is the plain log-probability and beam_size 1 is greedy decoding (with alpha > 0 a
    single beam may continue past a greedy EOS to a longer hypothesis that scores higher).
    """
    check_positive("beam_size", beam_size)
    check_positive("max_new_tokens", max_new_tokens)
    alpha = length_penalty
    logits_BxV, cache = prefill(inputs)
    batch = logits_BxV.shape[0]
    seqs_BxKxT = jnp.full((batch, beam_size, max_new_tokens), pad_id, jnp.int32)
    scores_BxK = jnp.full((batch, beam_size), NEG_INF, jnp.float32)
    beams = Beams(seqs_BxKxT, scores_BxK.at[:, 0].set(0.0), seqs_BxKxT, scores_BxK, jnp.zeros((batch,), bool))
    # Step 0 from the prefill logits: only beam 0 is live, so the K copies of the cache need no reorder.
    beams, _, token_BxK = _search_step(beams, jnp.repeat(logits_BxV, beam_size, axis=0), 0, eos_id=eos_id,
                                       alpha=alpha)
    cache = repeat_rows(cache, beam_size)

    def not_done(carry):
        step, beams, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(beams.done_B)

    def step_fn(carry):
        step, beams, parent_BxK, token_BxK, cache = carry
        cache = gather_beams(cache, parent_BxK)
        logits_BKxV, cache = extend(cache, token_BxK.reshape(-1))
        beams, parent_BxK, token_BxK = _search_step(beams, logits_BKxV, step, eos_id=eos_id, alpha=alpha)
        return step + 1, beams, parent_BxK, token_BxK, cache

    parent_BxK = jnp.zeros((batch, beam_size), jnp.int32)
    carry = (jnp.asarray(1, jnp.int32), beams, parent_BxK, token_BxK, cache)
    return jax.lax.while_loop(not_done, step_fn, carry)[1].finished_seqs_BxKxT[:, 0]
