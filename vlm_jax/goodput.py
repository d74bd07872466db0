"""Goodput: where a run's wall time goes.

Every second of wall time since the recorder started is attributed to exactly one cause, so the parts sum to
the wall time by construction:

    step        training steps: dispatching them and waiting for the device (goodput)
    compile     tracing, lowering and XLA compilation anywhere in the run (train step, evaluators, restore)
    data_wait   fetching the next batch while the device had nothing left to run
    checkpoint  saving and restoring checkpoints (and waiting for an async save to finish)
    evaluation  evaluators
    startup     before the first step: mesh, model init, data iterator, evaluator setup
    other       anything else (export, the tail after the last step); small when the wiring is complete

Time outside any `timed` block counts as the current base cause (`switch`): "startup" at first, "step" while
the training loop runs. Blocks nest; time goes to the innermost one.

Compile time comes from JAX's own monitoring events (`/jax/core/compile/jaxpr_trace_duration`,
`.../jaxpr_to_mlir_module_duration`, `.../backend_compile_duration`, which in jax 0.10 are disjoint and cover
the outermost trace only; backend compile includes a persistent-cache lookup). They are counted only on the
thread that created the recorder (an orbax save thread compiling overlaps the main thread's time), and carved
out of whatever block was running: the first train step's compilation counts as compile, its execution as step.

Data wait with asynchronous dispatch: the trainer dispatches step N before fetching step N+1's batch, so a
fetch that ends while step N is still running overlapped with compute and is step time. `data_wait(pending)`
counts the fetch as data wait only when `pending` (the previous step's outputs) is ready when the fetch ends,
i.e. the device went idle at some point during the fetch (the whole fetch is counted: an upper bound).

Resumed runs: the recorder measures one process's lifetime, so totals restart at every (re)start; the earlier
attempts' intervals stay in metrics.jsonl up to the checkpoint they resumed from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator

import jax

GOOD = "step"
BADPUT = ("compile", "data_wait", "checkpoint", "evaluation", "startup", "other")
CAUSES = (GOOD, *BADPUT)
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})


@dataclasses.dataclass
class _Block:
    cause: str
    seconds: float = 0.0  # attributed to the block, not yet committed to its cause


class Goodput:
    """Attributes wall time to causes; reports per interval (`interval`) and for the whole run (`totals`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, listen: bool = True):
        """`listen`: count JAX compile events (False in tests that feed `record_compile` by hand)."""
        self._clock, self._thread = clock, threading.get_ident()
        self._mark = clock()
        self._blocks = [_Block("startup")]
        self._total = dict.fromkeys(CAUSES, 0.0)
        self._interval = dict.fromkeys(CAUSES, 0.0)
        self._listening = listen
        if listen:
            jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def close(self) -> None:
        """Stops listening to JAX compile events (idempotent)."""
        if self._listening:
            jax.monitoring.unregister_event_duration_listener(self._on_event)
            self._listening = False

    def __enter__(self) -> Goodput:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def switch(self, cause: str) -> None:
        """From now on, time outside any `timed` block counts as `cause`."""
        _check(cause)
        self._flush()
        self._commit(self._blocks[0])
        self._blocks[0].cause = cause

    @contextlib.contextmanager
    def timed(self, cause: str) -> Iterator[None]:
        """Attributes the time inside the block (less compile time and nested blocks) to `cause`."""
        _check(cause)
        block = self._push(cause)
        try:
            yield
        finally:
            self._pop(block)

    @contextlib.contextmanager
    def data_wait(self, pending: Any) -> Iterator[None]:
        """Fetching a batch: data wait if the device finished `pending` (a pytree of the last dispatched step's
        arrays; None: nothing dispatched) by the end of the block, else the enclosing cause (overlapped)."""
        block = self._push("data_wait")
        try:
            yield
        finally:
            if not all(leaf.is_ready() for leaf in jax.tree.leaves(pending)):
                block.cause = self._blocks[-2].cause
            self._pop(block)

    def record_compile(self, seconds: float) -> None:
        """`seconds` of compilation that ended just now, carved out of the running block."""
        now = self._clock()
        elapsed = now - self._mark
        compiled = min(max(seconds, 0.0), elapsed)  # a compile cannot predate the last mark (sums stay exact)
        self._blocks[-1].seconds += elapsed - compiled
        self._add("compile", compiled)
        self._mark = now

    def interval(self) -> dict[str, float]:
        """Metrics of the time since the previous call (or the start): `goodput/fraction`, `goodput/wall_s`,
        `goodput/step_s` and `badput/<cause>_s`; resets the interval."""
        self._commit_all()
        scalars = _scalars(self._interval, "")
        self._interval = dict.fromkeys(CAUSES, 0.0)
        return scalars

    def totals(self) -> dict[str, float]:
        """The same figures for the whole run so far, as `goodput/total_fraction`, `badput/total_<cause>_s`..."""
        self._commit_all()
        return _scalars(self._total, "total_")

    def summary(self) -> str:
        """The console line, e.g. 'goodput 87.3% (compile 4.1 s, data wait 2.0 s, ...) of 120.4 s'."""
        self._commit_all()
        wall = sum(self._total.values())
        parts = ", ".join(f"{cause.replace('_', ' ')} {self._total[cause]:.1f} s" for cause in BADPUT)
        return f"goodput {100 * self._total[GOOD] / max(wall, 1e-9):.1f}% ({parts}) of {wall:.1f} s"

    def _on_event(self, event: str, seconds: float, **_: Any) -> None:
        if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
            self.record_compile(seconds)

    def _push(self, cause: str) -> _Block:
        self._flush()
        block = _Block(cause)
        self._blocks.append(block)
        return block

    def _pop(self, block: _Block) -> None:
        self._flush()
        assert self._blocks[-1] is block, "goodput blocks must nest"
        self._blocks.pop()
        self._commit(block)

    def _flush(self) -> None:
        """Attributes the time since the last mark to the innermost block."""
        now = self._clock()
        self._blocks[-1].seconds += now - self._mark
        self._mark = now

    def _commit(self, block: _Block) -> None:
        self._add(block.cause, block.seconds)
        block.seconds = 0.0

    def _commit_all(self) -> None:
        self._flush()
        for block in self._blocks:
            self._commit(block)

    def _add(self, cause: str, seconds: float) -> None:
        self._total[cause] += seconds
        self._interval[cause] += seconds


def _check(cause: str) -> None:
    if cause not in CAUSES:
        raise ValueError(f"unknown goodput cause {cause!r}; choose from {CAUSES}")


def _scalars(seconds: dict[str, float], prefix: str) -> dict[str, float]:
    wall = sum(seconds.values())
    return {f"goodput/{prefix}fraction": seconds[GOOD] / wall if wall > 0 else 0.0,
            f"goodput/{prefix}wall_s": wall,
            f"goodput/{prefix}step_s": seconds[GOOD],
            **{f"badput/{prefix}{cause}_s": seconds[cause] for cause in BADPUT}}
