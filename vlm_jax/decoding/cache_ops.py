"""Row operations on decoding caches (beam tiling and reordering).

Shape key: B batch, N rows after the operation.

A cache is any pytree whose array leaves have the batch on axis 0; 0-d leaves (e.g. the write position) are
shared by all rows and pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def repeat_rows(cache: Any, n: int) -> Any:
    """Every row n times in a row on axis 0 (row b -> rows b*n .. b*n + n-1): B rows -> B*n rows."""
    return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, n, axis=0), cache)


def gather_rows(cache: Any, rows_N: jax.Array) -> Any:
    """Rows `rows_N` of every leaf, in that order (the beam reorder after a search step)."""
    return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows_N, axis=0), cache)
