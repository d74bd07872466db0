"""Random token dropout in training: FLIP's patch dropout before a ViT's encoder blocks (model.image.patch_dropout)
and image-token dropout before a decoder (model.image_token_dropout).

Each example keeps its own uniformly random subset of a fixed size, so shapes stay static; evaluation and
inference keep every token (the callers pass no key there).

Shape key: B batch, N tokens, K kept tokens, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_rate(rate: float, name: str) -> None:
    """One-line ValueError unless 0 <= rate < 1."""
    if not 0 <= rate < 1:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")


def kept_count(num_tokens: int, rate: float) -> int:
    """Tokens kept of `num_tokens` when a `rate` share is dropped: round((1 - rate) * N), at least 1."""
    return max(1, round((1 - rate) * num_tokens))


def kept_indices(rng: jax.Array, batch: int, num_tokens: int, keep: int) -> jax.Array:
    """int32 [B, K]: per example, `keep` distinct indices of [0, num_tokens) drawn uniformly, in increasing order."""
    noise_BxN = jax.random.uniform(rng, (batch, num_tokens))
    return jnp.sort(jnp.argsort(noise_BxN, axis=1)[:, :keep], axis=1).astype(jnp.int32)


def kept_mask(rng: jax.Array, batch: int, num_tokens: int, keep: int) -> jax.Array:
    """bool [B, N]: True on the tokens `kept_indices` keeps (same key, same subset)."""
    indices_BxK = kept_indices(rng, batch, num_tokens, keep)
    return jnp.any(indices_BxK[:, :, None] == jnp.arange(num_tokens)[None, None], axis=1)


def drop_tokens(x_BxNxD: jax.Array, rng: jax.Array, rate: float, always_keep: int = 0) -> jax.Array:
    """x_BxNxD with, per example, a random `kept_count` of its tokens after the first `always_keep` (a class
    token) kept in their order; the first `always_keep` are always kept."""
    head, rest = x_BxNxD[:, :always_keep], x_BxNxD[:, always_keep:]
    indices_BxK = kept_indices(rng, rest.shape[0], rest.shape[1], kept_count(rest.shape[1], rate))
    return jnp.concatenate([head, jnp.take_along_axis(rest, indices_BxK[..., None], axis=1)], axis=1)
