"""Row operations on decoding caches (beam tiling and reordering).

Shape key: B batch, K beams.

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


def gather_beams(cache: Any, parent_BxK: jax.Array) -> Any:
    """The beam reorder after a search step: row b*K + k takes row b*K + parent_BxK[b, k]. Gathered within each
    example (axis 1 of [B, K, ...]), so a batch-sharded cache stays on its devices (a flat gather over B*K rows
    would all-gather the whole cache every step)."""
    batch, beams = parent_BxK.shape

    def gather(x):
        if jnp.ndim(x) == 0:
            return x
        x_BxKx = x.reshape(batch, beams, *x.shape[1:])
        index = parent_BxK.reshape(batch, beams, *([1] * (x.ndim - 1)))
        return jnp.take_along_axis(x_BxKx, index, axis=1).reshape(x.shape)

    return jax.tree.map(gather, cache)
