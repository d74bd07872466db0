"""Metrics: JSONL always, TensorBoard event files (tensorboardX), W&B when configured, and a console progress line.

Only process 0 writes. Scalars are averaged over each logging interval, then the accumulator is reset.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from vlm_jax.wandb_writer import WandbWriter
from vlm_jax.workdir import open_rewritten, resolve


class MetricsWriter:
    """Writes scalar metrics of step `step` to `workdir/metrics.jsonl`, `workdir/tensorboard/` and, when
    `config.wandb.project` is set, to Weights & Biases (vlm_jax/wandb_writer.py)."""

    def __init__(self, workdir: str | os.PathLike, resumed_step: int = 0, enabled: bool | None = None,
                 config: ml_collections.ConfigDict | None = None):
        """Lines of `metrics.jsonl` after `resumed_step` (written before a crash) are dropped. `config`: the
        resolved config, for W&B."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tensorboard = self._wandb = None
        if self.enabled and config is not None and config.wandb.project is not None:
            self._wandb = WandbWriter(workdir, config)
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = resolve(workdir) / "metrics.jsonl"
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            self._jsonl = open_rewritten(path, "".join(line for line in lines if step_of(line) <= resumed_step))
            self._tensorboard = SummaryWriter(os.fspath(resolve(workdir) / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, float(value), step)
        self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.write(step, scalars)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.close()


def step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


class IntervalAverager:
    """Collects per-step metric dicts (device arrays) and averages an interval's worth on demand."""

    def __init__(self):
        self._pending: list[Mapping[str, Any]] = []

    def add(self, metrics: Mapping[str, Any]) -> None:
        self._pending.append(metrics)

    def take(self) -> list[Mapping[str, Any]]:
        """The metrics collected since the last call, without waiting for the device; resets."""
        taken, self._pending = self._pending, []
        return taken

    @staticmethod
    def mean(taken: list[Mapping[str, Any]]) -> dict[str, float]:
        """Fetches (blocks on the device) and averages each metric."""
        fetched = jax.device_get(taken)
        return {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}


class Progress:
    """Console line: step, loss, learning rate, samples/s and ETA."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.inf
        return (f"step {step}/{self.total_steps}  loss {scalars['loss']:.4f}  lr {scalars['lr']:.2e}  "
                f"{steps_per_s * self.batch_size:.0f} samples/s  eta {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
