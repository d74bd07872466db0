"""Running a jitted function over a host array in mesh-sharded batches."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from vlm_jax.parallel.sharding import to_global_batch


def apply_in_batches(fn: Callable[[jax.Array], jax.Array], array: np.ndarray, batch_size: int,
                     sharding: NamedSharding) -> np.ndarray:
    """fn over `array` in chunks of `batch_size` (the last chunk padded), concatenated on the host."""
    outputs = []
    for start in range(0, len(array), batch_size):
        chunk = array[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        result = fn(to_global_batch({"x": padded}, sharding)["x"])
        outputs.append(np.asarray(jax.device_get(result))[:len(chunk)])
    return np.concatenate(outputs)
