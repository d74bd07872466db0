"""Preprocessing that skips and counts bad samples, and the skip accounting that stops a run losing data.

Sources emit raw samples and skip records ({"__skipped__": {reason: n}}); `PreprocessIterDataset` runs the
ops on each sample, turns skip records, SampleErrors, samples a data.filters rule drops (SampleFiltered) and the
flags ops set on used samples (SAMPLE_FLAGS, e.g. truncated_captions) into counts, and attaches to every example
a "skipped" vector (COUNTERS order) holding the counts since the previous example, the example itself included
("examples": 1). Stages that merge examples (packed rows) sum their vectors. `SkipAccountingIterDataset` sums
those vectors over batches in the main process, reports them by name in skip_counts(), and raises DataError when
the skipped fraction (skip reasons only; flags and filtered samples are not skips) passes the limit. Both keep
their counters in the iterator state.
"""

from __future__ import annotations

import posixpath
import zlib
from typing import Callable

import grain
import numpy as np

from data_pipelines.samples import (FILTER_RULES, FLAGS_KEY, SAMPLE_FLAGS, SHARD_REASONS, SKIP_REASONS, DataError,
                                    SampleError, SampleFiltered)
from data_pipelines.webdataset import SHARD_START, log_skip

# The order is part of saved iterator states: new counters go last, so an older state's totals are a prefix.
COUNTERS = ("shards", "corrupt_image", "no_image", "no_caption", "duplicate_key", "truncated_tar", "unreadable_shard",
            "stalled_shard", "truncated_captions", "missing_field", *(f"filtered/{rule}" for rule in FILTER_RULES),
            "examples")
assert set(COUNTERS) == {"shards", "examples", *SKIP_REASONS, *SAMPLE_FLAGS, *(f"filtered/{r}" for r in FILTER_RULES)}
SKIPPED_KEY = "skipped"
_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_SKIPS = np.array([name in SKIP_REASONS for name in COUNTERS])  # the counters that are skips
_FILTERED = np.array([name.startswith("filtered/") for name in COUNTERS])
_EXAMPLES = _INDEX["examples"]


def sample_fingerprint(record: dict) -> int:
    """crc32 of the shard's file name and the sample key: the same whatever way the shard path is spelled
    (relative, absolute, through a link, another mount or bucket prefix)."""
    shard = posixpath.basename(record.get("__source__", "").split("?", 1)[0])
    return zlib.crc32(f"{shard}/{record.get('__key__', '')}".encode())


class _PreprocessIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, op: Callable, seed: int, max_consecutive_failures: int):
        super().__init__(parent)
        self._op, self._seed, self._max_failures = op, seed, max_consecutive_failures
        self._index = 0  # raw samples processed: with the key it seeds each sample's generator

    def __next__(self) -> dict:
        pending = np.zeros(len(COUNTERS), np.int32)
        failures, last = 0, ""
        while True:
            record = next(self._parent)
            pending[0] += bool(record.pop(SHARD_START, False))
            if "__skipped__" in record:
                for reason, count in record["__skipped__"].items():
                    pending[_INDEX[reason]] += count
                reason = ", ".join(record["__skipped__"])
                failures, last = failures + 1, f"{reason} in {record.get('__source__')} at {record.get('__where__')}"
            else:
                key = f"{record.get('__source__', '')}/{record.get('__key__', '')}"
                rng = np.random.default_rng([self._seed, self._index, sample_fingerprint(record)])
                self._index += 1
                try:
                    example = self._op(record, rng)
                except SampleError as e:
                    log_skip(e.reason, record.get("__source__", ""), record.get("__key__", ""), e)
                    pending[_INDEX[e.reason]] += 1
                    failures, last = failures + 1, f"{e} ({key})"
                except SampleFiltered as e:  # counted as failures too: filters that drop everything must not spin
                    pending[_INDEX[f"filtered/{e.rule}"]] += 1
                    failures, last = failures + 1, f"{e} ({key})"
                else:
                    for name in example.pop(FLAGS_KEY, ()):
                        pending[_INDEX[name]] += 1
                    pending[_EXAMPLES] = 1
                    example[SKIPPED_KEY] = pending
                    return example
            if failures >= self._max_failures:
                raise DataError(f"{failures} consecutive samples or shards were unusable or filtered (last: {last}); "
                                "check the shard paths, the data and data.filters")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "index": self._index}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._index = state["index"]


class PreprocessIterDataset(grain.IterDataset):
    """Raw samples -> examples via `op(sample, rng)`; bad samples and shards are counted, never raised."""

    def __init__(self, parent: grain.IterDataset, op: Callable, seed: int,
                 max_consecutive_failures: int = 1000):
        super().__init__(parent)
        self._op, self._seed, self._max_failures = op, seed, max_consecutive_failures

    def __iter__(self) -> _PreprocessIterator:
        return _PreprocessIterator(self._parent.__iter__(), self._op, self._seed, self._max_failures)


def lost_fraction(totals: np.ndarray, samples: int) -> float:
    """Estimated fraction of the data skipped: a shard that could not be read counts as an average shard.
    Filtered samples are read but not lost."""
    shard_failures = sum(int(totals[_INDEX[r]]) for r in SHARD_REASONS if r != "truncated_tar")
    sample_skips = int(totals[_SKIPS].sum()) - shard_failures
    read = samples + sample_skips + int(totals[_FILTERED].sum())
    per_shard = read / max(1, int(totals[0]) - shard_failures)
    lost = sample_skips + shard_failures * per_shard
    return lost / max(1.0, read + shard_failures * per_shard)


class _SkipAccountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, limit: float, min_samples: int):
        super().__init__(parent)
        self._limit, self._min_samples = limit, min_samples
        self._totals = np.zeros(len(COUNTERS), np.int64)
        self._samples = 0

    def __next__(self) -> dict:
        batch = next(self._parent)
        skipped = batch.pop(SKIPPED_KEY)
        counts = skipped.reshape(-1, len(COUNTERS)).sum(0)
        self._totals += counts
        self._samples += int(counts[_EXAMPLES])
        fraction = lost_fraction(self._totals, self._samples)
        if fraction > self._limit and self._samples + self._totals[_SKIPS].sum() >= self._min_samples:
            counts = self.skip_counts()
            reasons = ", ".join(f"{name} {counts[name]}" for name in SKIP_REASONS if counts[name])
            raise DataError(f"{fraction:.1%} of the input was skipped, more than the limit "
                            f"{self._limit:.1%} (data.max_skip_fraction): {reasons} "
                            f"({self._samples} samples and {counts['shards']} shards read)")
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Totals so far: skip reason -> count, 'shards' read, each of SAMPLE_FLAGS (e.g. 'truncated_captions':
        samples used with their caption truncated, not counted as skipped) and 'filtered/<rule>' per FILTER_RULES."""
        return {name: int(count) for name, count in zip(COUNTERS, self._totals) if name != "examples"}

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "totals": self._totals.tolist(), "samples": self._samples}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        totals = np.asarray(state["totals"], np.int64)  # a state saved before newer counters lacks them
        self._totals = np.concatenate([totals, np.zeros(len(COUNTERS) - len(totals), np.int64)])
        self._samples = state["samples"]


class SkipAccountingIterDataset(grain.IterDataset):
    """Batches without their "skipped" vectors; the iterator's skip_counts() has the totals.

    Raises DataError once the skipped fraction exceeds `limit` (checked after `min_samples` records).
    """

    def __init__(self, parent: grain.IterDataset, limit: float = 0.01, min_samples: int = 1000):
        super().__init__(parent)
        self._limit, self._min_samples = limit, min_samples

    def __iter__(self) -> _SkipAccountingIterator:
        return _SkipAccountingIterator(self._parent.__iter__(), self._limit, self._min_samples)
