"""Running a jitted function over host arrays in mesh-sharded batches."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def apply_in_batches(fn: Callable[..., Any], arrays: np.ndarray | tuple[np.ndarray, ...], batch_size: int,
                     sharding: NamedSharding) -> Any:
    """fn over `arrays` (one array, or a tuple of arrays with the same number of rows, passed as separate
    arguments) in chunks of `batch_size` rows, the last chunk padded; the outputs (an array or a pytree of
    arrays with rows first) concatenated on the host."""
    arrays = arrays if isinstance(arrays, tuple) else (arrays,)
    rows, outputs = len(arrays[0]), []
    for start in range(0, rows, batch_size):
        chunks = [array[start:start + batch_size] for array in arrays]
        padded = [np.concatenate([c, np.repeat(c[-1:], batch_size - len(c), axis=0)]) for c in chunks]
        # Every process holds the whole split: each device takes its rows from the host copy.
        inputs = [jax.make_array_from_callback(p.shape, sharding, lambda index, p=p: p[index]) for p in padded]
        result = fn(*inputs)
        outputs.append(jax.tree.map(
            lambda x, n=len(chunks[0]): np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n], result))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def check_finite(values: np.ndarray, what: str) -> None:
    """FloatingPointError naming how many rows of `values` are not finite."""
    if not np.isfinite(values).all():
        bad = int(np.sum(~np.isfinite(values).reshape(len(values), -1).all(axis=1)))
        raise FloatingPointError(f"{bad} of {len(values)} {what} are not finite: the parameters are probably NaN "
                                 f"or inf")


class Evaluator:
    """One evaluation: built once with its spec, environment and split, then `run(params, step)` -> metrics.

    Subclasses set `type` (the registry name), `prediction` (what they ask of the task: "embed", "score" or
    "decode"), `needs` (what the split must hold: "captions" and/or "class_labels") and `settings` (their
    config keys, with defaults)."""

    type: str = ""
    prediction: str = ""
    needs: tuple[str, ...] = ()
    settings: dict[str, Any] = {}

    def __init__(self, spec, env, data):
        self.spec, self.env, self.data = spec, env, data
        self.options = {**self.settings, **spec.settings}

    @classmethod
    def fields(cls, settings: dict[str, Any]) -> tuple[str, ...]:
        """The `.json` fields of the split this evaluator reads, given its settings (none by default)."""
        return ()

    @classmethod
    def missing(cls, data) -> str | None:
        """What the split lacks for this evaluator, or None."""
        if "captions" in cls.needs and not data.has_captions:
            return "captions"
        if "class_labels" in cls.needs and not data.has_class_labels:
            return "class labels for every image and data.classnames / data.templates"
        return None

    def run(self, params, step: int, *, require_finite: bool = False) -> dict[str, float]:
        raise NotImplementedError
