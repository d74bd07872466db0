"""Next-token samplers: greedy, temperature, top-k and nucleus (top-p), applied in that order.

Shape key: B batch, V vocabulary, K kept tokens.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked; hashable, so a jitted decoder can take it as a static argument.

    temperature 0 is greedy (argmax; top_k and top_p are then unused). Otherwise the logits are divided by the
    temperature, then only the top_k most likely tokens are kept (0: all), then only the nucleus: the smallest
    set of most likely tokens whose probability reaches top_p (1.0: all; always at least the top token).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"sampling temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
            raise ValueError(f"sampling top_k must be an integer >= 0 (0 keeps every token), got {k!r}")
        if not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1] (1 keeps every token), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _keep_sorted(logits_BxV: jax.Array, order_BxV: jax.Array, keep_sorted_BxV: jax.Array) -> jax.Array:
    """Logits where `keep_sorted` (given in `order`) holds, -inf elsewhere."""
    rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
    keep_BxV = jnp.zeros(logits_BxV.shape, bool).at[rows_Bx1, order_BxV].set(keep_sorted_BxV)
    return jnp.where(keep_BxV, logits_BxV, -jnp.inf)


def top_k_filter(logits_BxV: jax.Array, k: int) -> jax.Array:
    """Exactly the k largest logits of each row (ties: the lower ids), the others -inf."""
    if k >= logits_BxV.shape[-1]:
        return logits_BxV
    _, top_BxK = jax.lax.top_k(logits_BxV, k)
    return _keep_sorted(logits_BxV, top_BxK, jnp.ones(top_BxK.shape, bool))


def top_p_filter(logits_BxV: jax.Array, p: float) -> jax.Array:
    """The nucleus: the fewest most likely tokens whose probabilities sum to >= p (at least one); others -inf."""
    order_BxV = jnp.argsort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(jnp.take_along_axis(logits_BxV, order_BxV, axis=-1), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the more likely tokens
    return _keep_sorted(logits_BxV, order_BxV, mass_before_BxV < p)


def filter_logits(logits_BxV: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p: the logits to sample from, excluded tokens at -inf (not greedy)."""
    logits_BxV = logits_BxV.astype(jnp.float32) / config.temperature
    if config.top_k:
        logits_BxV = top_k_filter(logits_BxV, config.top_k)
    if config.top_p < 1:
        logits_BxV = top_p_filter(logits_BxV, config.top_p)
    return logits_BxV


def sample_tokens(logits_BxV: jax.Array, config: SamplingConfig, rng: jax.Array | None) -> jax.Array:
    """One int32 token per row: argmax when greedy (rng unused), else a draw from the filtered softmax."""
    if config.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_BxV, config), axis=-1).astype(jnp.int32)
