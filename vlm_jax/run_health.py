"""What the trainer checks before it saves, logs or evaluates: every step finite, every process with data.

Both are tracked on the device, step by step, without a host transfer per step; the trainer fetches the record
only where it must wait for the device anyway (a checkpoint save) or one step late (the log line).

Data on several processes: a process whose iterator ends (finite `data.num_epochs`) or fails (the skip limit)
cannot simply stop, as the others would wait in the next step's collectives forever. Instead `DataFeed` keeps
feeding placeholder batches whose `valid` rows say why (0: ran out, -1: failed); the train step applies no update
when any row is not 1, and at the next check every process sees the same record and stops at the same step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.train_step import VALID_KEY

HAS_DATA, RAN_OUT, FAILED = 1, 0, -1


class EndOfData(Exception):
    """Every process has stopped feeding data: training ends after `last_step`."""

    def __init__(self, last_step: int, message: str):
        super().__init__(message)
        self.last_step = last_step


@dataclasses.dataclass(frozen=True)
class HealthRecord:
    first_nonfinite_step: int  # 0: none
    first_step_without_data: int  # 0: none
    data_status: int  # the worst `valid` value seen: HAS_DATA, RAN_OUT or FAILED


@jax.jit
def _record(record: jax.Array, step: jax.Array, finite: jax.Array, data_status: jax.Array) -> jax.Array:
    first_nonfinite = jnp.where((record[0] == 0) & ~finite, step, record[0])
    first_without_data = jnp.where((record[1] == 0) & (data_status < HAS_DATA), step, record[1])
    return jnp.stack([first_nonfinite, first_without_data, jnp.minimum(record[2], data_status)])


class RunHealth:
    """The device-side record of a run's steps since it started (or resumed)."""

    def __init__(self):
        self._record = jnp.array([0, 0, HAS_DATA], jnp.int32)
        self._has_data = jnp.int32(HAS_DATA)  # the status of a step without a `valid` batch key (one process)

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Folds in one step's `finite` and `data_status` metrics (dispatched, not waited for)."""
        status = metrics.get("data_status", self._has_data)
        self._record = _record(self._record, jnp.int32(step), metrics["finite"], status)

    def snapshot(self) -> jax.Array:
        """The record as of now, to fetch later (the array is immutable)."""
        return self._record

    @staticmethod
    def fetch(snapshot: jax.Array) -> HealthRecord:
        return HealthRecord(*(int(x) for x in jax.device_get(snapshot)))


class DataFeed:
    """Global batches for the train step from this process's host batches.

    With one process, the end of the data raises EndOfData at once and a data error propagates. With several,
    the process goes on feeding placeholder batches marked in `valid` (see the module docstring) and keeps the
    reason, for the trainer to report when all processes have seen the record.
    """

    def __init__(self, iterator: Iterator[dict[str, np.ndarray]], to_global: Callable[[dict], dict],
                 placeholder: dict[str, np.ndarray], process_count: int):
        self._iterator, self._to_global, self._placeholder = iterator, to_global, placeholder
        self._several = process_count > 1
        self._rows = len(next(iter(placeholder.values())))  # this process's rows of a batch
        self.status, self.error = HAS_DATA, None

    def next(self, step: int) -> dict[str, jax.Array]:
        if self.status == HAS_DATA:
            try:
                batch = next(self._iterator)
            except StopIteration:
                if not self._several:
                    raise EndOfData(step - 1, f"the training data ran out at step {step}") from None
                self.status = RAN_OUT
            except Exception as e:  # noqa: BLE001 - reported by the trainer once every process has stopped
                if not self._several:
                    raise
                self.status, self.error = FAILED, e
            else:
                if self._several:
                    batch = {**batch, VALID_KEY: np.full((self._rows,), HAS_DATA, np.int32)}
                return self._to_global(batch)
        return self._to_global({**self._placeholder, VALID_KEY: np.full((self._rows,), self.status, np.int32)})


def zeros_like_batch(abstract: dict[str, Any]) -> dict[str, np.ndarray]:
    """Host zeros with the shapes and dtypes of `abstract` (a dict of ShapeDtypeStructs)."""
    return {key: np.zeros(value.shape, value.dtype) for key, value in abstract.items()}
