"""Running a jitted function over a host array in mesh-sharded batches."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def apply_in_batches(fn: Callable[[jax.Array], jax.Array], array: np.ndarray, batch_size: int,
                     sharding: NamedSharding) -> np.ndarray:
    """fn over `array` in chunks of `batch_size` (the last chunk padded), concatenated on the host."""
    outputs = []
    for start in range(0, len(array), batch_size):
        chunk = array[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        # Every process holds the whole split: each device takes its rows from the host copy.
        result = fn(jax.make_array_from_callback(padded.shape, sharding, lambda index: padded[index]))
        outputs.append(np.asarray(multihost_utils.process_allgather(result, tiled=True))[:len(chunk)])
    return np.concatenate(outputs)
