"""Padding to block sizes, shared by the attention implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def pad_to(x: jax.Array, sizes: dict[int, int], value: int | float = 0) -> jax.Array:
    """`x` padded at the end of each axis in `sizes` to that size, with `value`."""
    widths = [(0, sizes.get(axis, length) - length) for axis, length in enumerate(x.shape)]
    return jnp.pad(x, widths, constant_values=value)
