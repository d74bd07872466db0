"""vlm_jax.decoding on toy models that implement the prefill / extend / forward protocol.

Shape key: B batch, N prefix ("image") tokens, D width, V vocabulary, T tokens, L cache length, S prompt and
tokens, Q query positions.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.decoding import (SamplingConfig, beam_search, decoder_from_forward, filter_logits, generate,
                              greedy_by_recomputation, length_divisor, sample_tokens)

PAD, BOS, EOS = 0, 1, 2


class ToyLM:
    """A one-layer, one-head causal attention LM with random weights and a real KV cache.

    The prompt is N continuous prefix vectors (the "image") followed by BOS.
    """

    def __init__(self, vocab: int = 11, max_new_tokens: int = 8, width: int = 16, prefix_len: int = 3,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n, self.vocab = prefix_len, vocab
        self.max_len = prefix_len + max_new_tokens  # prompt + the T - 1 fed-back tokens
        shapes = dict(embed=(vocab, width), pos=(self.max_len, width), wq=(width, width), wk=(width, width),
                      wv=(width, width), wo=(width, width), out=(width, vocab))
        self.w = {k: jnp.asarray(rng.normal(size=s) * (1 if k in ("embed", "pos") else width ** -0.5), jnp.float32)
                  for k, s in shapes.items()}

    def inputs(self, batch: int, seed: int = 1) -> jax.Array:
        return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, self.n, self.w["embed"].shape[1])),
                           jnp.float32)

    def _layer(self, x_BxQxD, k_BxLxD, v_BxLxD, mask_QxL):
        w = self.w
        att_BxQxL = jnp.einsum("bqd,bkd->bqk", x_BxQxD @ w["wq"], k_BxLxD) / np.sqrt(x_BxQxD.shape[-1])
        att_BxQxL = jax.nn.softmax(jnp.where(mask_QxL, att_BxQxL, -1e9), axis=-1)
        h_BxQxD = x_BxQxD + jnp.einsum("bqk,bkd->bqd", att_BxQxL, v_BxLxD) @ w["wo"]
        return h_BxQxD @ w["out"]

    def _prompt(self, prefix_BxNxD, tokens_BxT):
        x = jnp.concatenate([prefix_BxNxD, self.w["embed"][tokens_BxT]], axis=1)
        return x + self.w["pos"][: x.shape[1]]

    def forward(self, prefix_BxNxD, tokens_BxT):
        x_BxSxD = self._prompt(prefix_BxNxD, tokens_BxT)
        causal_SxS = jnp.tril(jnp.ones((x_BxSxD.shape[1],) * 2, bool))
        return self._layer(x_BxSxD, x_BxSxD @ self.w["wk"], x_BxSxD @ self.w["wv"], causal_SxS)[:, self.n:]

    def prefill(self, prefix_BxNxD):
        batch, s = prefix_BxNxD.shape[0], self.n + 1
        x_BxSxD = self._prompt(prefix_BxNxD, jnp.full((batch, 1), BOS))
        k_BxLxD = jnp.zeros((batch, self.max_len, x_BxSxD.shape[-1])).at[:, :s].set(x_BxSxD @ self.w["wk"])
        v_BxLxD = jnp.zeros_like(k_BxLxD).at[:, :s].set(x_BxSxD @ self.w["wv"])
        causal_SxL = jnp.arange(self.max_len)[None, :] <= jnp.arange(s)[:, None]
        logits_BxV = self._layer(x_BxSxD, k_BxLxD, v_BxLxD, causal_SxL)[:, -1]
        return logits_BxV, {"k": k_BxLxD, "v": v_BxLxD, "pos": jnp.asarray(s, jnp.int32)}

    def extend(self, cache, tokens_B):
        pos = cache["pos"]
        x_Bx1xD = self.w["embed"][tokens_B][:, None] + jax.lax.dynamic_slice_in_dim(self.w["pos"], pos, 1)
        k_BxLxD = jax.lax.dynamic_update_slice_in_dim(cache["k"], x_Bx1xD @ self.w["wk"], pos, axis=1)
        v_BxLxD = jax.lax.dynamic_update_slice_in_dim(cache["v"], x_Bx1xD @ self.w["wv"], pos, axis=1)
        logits_BxV = self._layer(x_Bx1xD, k_BxLxD, v_BxLxD, jnp.arange(self.max_len)[None] <= pos)[:, 0]
        return logits_BxV, {"k": k_BxLxD, "v": v_BxLxD, "pos": pos + 1}


class TrigramLM:
    """Next-token logits = table[previous token, current token] + a per-row bias (the "image"); BOS starts.

    The history matters a lot, so a beam search that forgets to reorder the cache fails on it.
    """

    def __init__(self, vocab: int = 5, seed: int = 0, eos_handicap: float = 2.0):
        self.vocab = vocab
        table_VxVxV = np.random.default_rng(seed).normal(size=(vocab,) * 3) * 2
        table_VxVxV[..., EOS] -= eos_handicap  # long hypotheses: the cache history matters
        self.table_VxVxV = jnp.asarray(table_VxVxV, jnp.float32)

    def inputs(self, batch: int, seed: int = 1) -> jax.Array:
        return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, self.vocab)), jnp.float32)

    def forward(self, bias_BxV, tokens_BxT):
        previous_BxT = jnp.concatenate([jnp.full_like(tokens_BxT[:, :1], BOS), tokens_BxT[:, :-1]], axis=1)
        return self.table_VxVxV[previous_BxT, tokens_BxT] + bias_BxV[:, None]

    def prefill(self, bias_BxV):
        bos_B = jnp.full(bias_BxV.shape[:1], BOS)
        cache = {"bias": bias_BxV, "last": bos_B, "pos": jnp.int32(0)}  # pos: a 0-d leaf, shared by all rows
        return self.table_VxVxV[bos_B, bos_B] + bias_BxV, cache

    def extend(self, cache, tokens_B):
        logits_BxV = self.table_VxVxV[cache["last"], tokens_B] + cache["bias"]
        return logits_BxV, {"bias": cache["bias"], "last": tokens_B, "pos": cache["pos"] + 1}


class ScriptedLM:
    """Next-token logits depend on the step only: inputs are logits_BxLxV and step t returns logits[:, t].

    Counts extend calls (a debug callback runs once per while-loop iteration).
    """

    def __init__(self, vocab: int = 6):
        self.vocab, self.extend_calls = vocab, 0

    def _count(self):
        self.extend_calls += 1

    def forward(self, logits_BxLxV, tokens_BxT):
        return logits_BxLxV[:, : tokens_BxT.shape[1]]

    def prefill(self, logits_BxLxV):
        return logits_BxLxV[:, 0], {"logits": logits_BxLxV, "pos": jnp.int32(1)}

    def extend(self, cache, tokens_B):
        jax.debug.callback(self._count)
        logits_BxV = jax.lax.dynamic_index_in_dim(cache["logits"], cache["pos"], axis=1, keepdims=False)
        return logits_BxV, {"logits": cache["logits"], "pos": cache["pos"] + 1}


def jit_generate(lm, **kw):
    return jax.jit(functools.partial(generate, lm.prefill, lm.extend, eos_id=EOS, **kw))


def eos_steps(tokens_BxT) -> list[int]:
    """Index of each row's first EOS, -1 if none."""
    return [list(row).index(EOS) if EOS in row else -1 for row in np.asarray(tokens_BxT)]


# A toy (seed 43) whose four greedy rows end at steps 5, 6, never and 2 (asserted where it matters).
LM, T = ToyLM(max_new_tokens=8, seed=43), 8
X = LM.inputs(4, seed=143)


def test_cached_greedy_equals_recomputation():
    cached = jit_generate(LM, max_new_tokens=T)(X)
    recomputed = jax.jit(functools.partial(greedy_by_recomputation, LM.forward, bos_id=BOS, max_new_tokens=T,
                                           eos_id=EOS))(X)
    assert eos_steps(cached) == [5, 6, -1, 2]
    np.testing.assert_array_equal(cached, recomputed)


def test_beam_size_one_is_greedy():
    greedy = jit_generate(LM, max_new_tokens=T)(X)
    beam = jax.jit(functools.partial(beam_search, LM.prefill, LM.extend, beam_size=1, max_new_tokens=T,
                                     eos_id=EOS, length_penalty=0.0))(X)
    np.testing.assert_array_equal(beam, greedy)


def test_top_k_1_and_tiny_top_p_sample_greedily():
    greedy = jit_generate(LM, max_new_tokens=T)(X)
    for cfg in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=2.0, top_p=1e-6)):
        sampled = jit_generate(LM, max_new_tokens=T, sampling=cfg)(X, rng=jax.random.key(3))
        np.testing.assert_array_equal(sampled, greedy)


def exhaustive_best(lm, inputs, max_new_tokens, alpha):
    """Each row's best-scoring sequence of all (ending at its first EOS or at max_new_tokens, pad after EOS),
    and the smallest gap to a runner-up. Score: summed log-probs / ((5 + length) / 6) ** alpha."""
    seqs_SxT = np.array(list(itertools.product(range(lm.vocab), repeat=max_new_tokens)))
    is_eos_SxT = seqs_SxT == EOS
    length_S = np.where(is_eos_SxT.any(1), is_eos_SxT.argmax(1) + 1, max_new_tokens)
    valid_SxT = np.arange(max_new_tokens) < length_S[:, None]
    canonical_SxT = np.where(valid_SxT, seqs_SxT, PAD)
    tokens_in_SxT = np.concatenate([np.full((len(seqs_SxT), 1), BOS), seqs_SxT[:, :-1]], axis=1)
    best, margins = [], []
    for row in np.asarray(inputs):
        row_inputs = jnp.broadcast_to(row, (len(seqs_SxT),) + row.shape)  # the row, once per sequence
        logp_SxTxV = np.asarray(jax.nn.log_softmax(lm.forward(row_inputs, jnp.asarray(tokens_in_SxT))), np.float64)
        logp_SxT = np.take_along_axis(logp_SxTxV, seqs_SxT[..., None], axis=-1)[..., 0]
        score_S = (logp_SxT * valid_SxT).sum(1) / ((5.0 + length_S) / 6.0) ** alpha
        order = np.argsort(-score_S, kind="stable")
        runner_up = next(i for i in order if (canonical_SxT[i] != canonical_SxT[order[0]]).any())
        best.append(canonical_SxT[order[0]])
        margins.append(score_S[order[0]] - score_S[runner_up])
    return np.stack(best), min(margins)


# Vocabulary 5, 4 tokens: at most 4^3 live prefixes and 16 * 5 candidates in a step, so 80 beams keep them all.
# Seeds where greedy is not the optimum; on the trigram toy, dropping the beam reorder of the cache fails.
EXHAUSTIVE_TOYS = {"attention": lambda: (ToyLM(vocab=5, max_new_tokens=4, seed=7), 14),
                   "trigram": lambda: (TrigramLM(vocab=5, seed=1), 8)}


@pytest.mark.slow
@pytest.mark.parametrize("toy", sorted(EXHAUSTIVE_TOYS))
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_equals_exhaustive_search(toy, alpha):
    (lm, input_seed), t = EXHAUSTIVE_TOYS[toy](), 4
    x = lm.inputs(3, seed=input_seed)
    want, margin = exhaustive_best(lm, x, t, alpha)
    assert margin > 1e-4  # the optimum is not a near tie
    search = functools.partial(beam_search, beam_size=80, max_new_tokens=t, eos_id=EOS, length_penalty=alpha)
    np.testing.assert_array_equal(jax.jit(functools.partial(search, lm.prefill, lm.extend))(x), want)
    no_cache = decoder_from_forward(lm.forward, bos_id=BOS, max_new_tokens=t)
    np.testing.assert_array_equal(jax.jit(functools.partial(search, *no_cache))(x), want)
    greedy = jit_generate(lm, max_new_tokens=t)(x)
    assert (np.asarray(greedy) != want).any()  # the search matters on this toy


SCRIPT = np.array([[3, 2, 4, 4, 5, 3, 3, 4, 5, 3],   # EOS (2) at step 1, then more tokens that must become pad
                   [4, 5, 3, 2, 5, 5, 2, 3, 4, 4],   # EOS at step 3
                   [5, 4, 3, 5, 2, 3, 3, 4, 2, 4],   # EOS at step 4
                   [3, 3, 2, 4, 4, 2, 5, 5, 3, 3]])  # EOS at step 2
SCRIPT_LOGITS = 10.0 * jax.nn.one_hot(SCRIPT, 6)  # row b's step t is nearly sure of SCRIPT[b, t]


def expected_tokens(script, max_new_tokens):
    out = np.full((len(script), max_new_tokens), PAD)
    for b, row in enumerate(script[:, :max_new_tokens]):
        n = list(row).index(EOS) + 1 if EOS in row else max_new_tokens
        out[b, :n] = row[:n]
    return out


@pytest.mark.parametrize("max_new_tokens", [10, 3])
def test_per_row_eos_pads_and_the_loop_stops_early(max_new_tokens):
    lm = ScriptedLM()
    tokens = jit_generate(lm, max_new_tokens=max_new_tokens)(SCRIPT_LOGITS)
    jax.effects_barrier()
    np.testing.assert_array_equal(tokens, expected_tokens(SCRIPT, max_new_tokens))
    # The last row finishes at step 4: 4 extend calls, not 9; with 3 tokens, 2 calls (none after the last).
    assert lm.extend_calls == min(4, max_new_tokens - 1)


def test_beam_search_stops_early():
    lm = ScriptedLM()
    tokens = jax.jit(functools.partial(beam_search, lm.prefill, lm.extend, beam_size=3, max_new_tokens=10,
                                       eos_id=EOS))(SCRIPT_LOGITS)
    jax.effects_barrier()
    np.testing.assert_array_equal(tokens, expected_tokens(SCRIPT, 10))
    assert lm.extend_calls == 4


def test_beam_search_early_stop_allows_for_the_length_penalty():
    """EOS first scores -1.19; "a b" then has log-prob -1.60, which at its own length (3 with EOS) could not
    beat that, but "a b c EOS" at length 4 scores -1.11: the stop rule must use the longest reachable length."""
    probs_LxV = np.array([[.0065, .0065, .304, .670, .0065, .0065],  # pad bos EOS a b c
                          [.28, .05, .05, .04, .30, .28],
                          [.006, .006, .006, .006, .006, .97],
                          [.006, .006, .97, .006, .006, .006]])
    lm, logits_1xLxV = ScriptedLM(), jnp.log(jnp.asarray(probs_LxV, jnp.float32))[None]
    tokens = jax.jit(functools.partial(beam_search, lm.prefill, lm.extend, beam_size=2, max_new_tokens=4,
                                       eos_id=EOS, length_penalty=1.0))(logits_1xLxV)
    np.testing.assert_array_equal(tokens, [[3, 4, 5, EOS]])
    np.testing.assert_array_equal(tokens, exhaustive_best(lm, logits_1xLxV, 4, 1.0)[0])


def numpy_filtered_probs(logits_V, temperature, top_k, top_p):
    """The reference: softmax(logits / temperature) restricted to the top-k, then to the nucleus, renormalised."""
    z = logits_V / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    cumulative = np.cumsum(p[order])
    assert np.abs(cumulative - top_p).min() > 1e-4 or top_p == 1  # not at a boundary
    nucleus = order[: np.searchsorted(cumulative, top_p) + 1]  # first index whose cumulative mass reaches p
    p = np.where(np.isin(np.arange(len(z)), nucleus), p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.3), (1.0, 0, 0.75), (1.0, 0, 0.95), (1.0, 0, 1.0),
                                                     (0.5, 4, 0.8), (2.0, 3, 1.0), (1.0, 0, 1e-3)])
def test_filters_keep_exactly_the_reference_set(temperature, top_k, top_p):
    logits_BxV = np.random.default_rng(0).normal(size=(6, 11)) * 2
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got_BxV = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits_BxV, jnp.float32), cfg), axis=-1))
    want_BxV = np.stack([numpy_filtered_probs(row, temperature, top_k, top_p) for row in logits_BxV])
    np.testing.assert_array_equal(got_BxV > 0, want_BxV > 0)
    np.testing.assert_allclose(got_BxV, want_BxV, atol=1e-6)


def test_temperature_sampling_matches_the_softmax():
    logits_V = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
    cfg = SamplingConfig(temperature=0.7)
    tokens = jax.jit(sample_tokens, static_argnums=1)(jnp.tile(logits_V, (4000, 1)), cfg, jax.random.key(0))
    frequencies = np.bincount(np.asarray(tokens), minlength=5) / 4000
    np.testing.assert_allclose(frequencies, jax.nn.softmax(logits_V / 0.7), atol=0.03)


def test_length_divisor_is_gnmt():
    np.testing.assert_allclose(length_divisor(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)
    assert float(length_divisor(3, 0.0)) == 1.0


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_configs_fail_in_one_line(kwargs):
    with pytest.raises(ValueError, match="sampling") as err:
        SamplingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_decoding_arguments_fail_clearly():
    with pytest.raises(ValueError, match="rng"):
        generate(LM.prefill, LM.extend, X, max_new_tokens=4, eos_id=EOS, sampling=SamplingConfig(temperature=1.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(LM.prefill, LM.extend, X, max_new_tokens=0, eos_id=EOS)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(LM.prefill, LM.extend, X, beam_size=0, max_new_tokens=4, eos_id=EOS)
