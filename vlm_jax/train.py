"""Training entry point: one loop for every objective.

    python -m vlm_jax.train --config=configs/demo/siglip_tiny.py --workdir=DIR [--config.key=value ...]

Re-running the same command resumes from the newest complete checkpoint in DIR. SIGTERM is a preemption
notice: every process saves at the same next step (state and data iterator) and exits 42, for the launcher to
restart the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, NoReturn

import jax
import ml_collections

from data_pipelines import input_pipeline
from data_pipelines.samples import DataError
from data_pipelines.tokenizer import Tokenizer
from vlm_jax import checkpoint
from vlm_jax.config import (ConfigError, check_resume_changes, load_config, load_saved_config, resume_changes,
                            save_config)
from vlm_jax.evaluate import USER_ERRORS
from vlm_jax.evaluators.registry import Evaluations
from vlm_jax.goodput import Goodput
from vlm_jax.kernels.attention import check_backend
from vlm_jax.metrics import IntervalAverager, MetricsWriter, Progress
from vlm_jax.parallel.distributed import (PREEMPTED_EXIT_CODE, DistributedOptions, Preempted, PreemptionNotice,
                                          initialize, options_from_env)
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.param_table import log_parameter_table
from vlm_jax.parallel.sharding import batch_sharding, data_parallel_size, to_global_batch
from vlm_jax.run_health import FAILED, RAN_OUT, DataFeed, EndOfData, RunHealth, zeros_like_batch
from vlm_jax.hf.export import PeriodicExport
from vlm_jax.param_init import initialise_from
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout, param_count
from vlm_jax.train_step import make_train_step
from vlm_jax.workdir import resolve


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def make_train_iterator(config: ml_collections.ConfigDict):
    """This process's iterator of host batches, from the configured shards or mixture."""
    options = input_pipeline.from_config(
        config.data, image_size=config.model.image.image_size, text_len=config.model.text.max_len,
        global_batch_size=config.batch_size, seed=config.seed)
    dataset = input_pipeline.make_train_dataset(
        options, process_index=jax.process_index(), process_count=jax.process_count())
    return iter(dataset)


NOT_SKIPS = ("shards", "truncated_captions")  # counters of data that was used


def data_counters(data_iterator) -> dict[str, float]:
    """data/shards (shards opened), data/truncated_captions, data/filtered/<rule> (data.filters) and
    data/skipped/<reason> totals of this process's input."""
    return {(f"data/{name}" if name in NOT_SKIPS or name.startswith("filtered/") else f"data/skipped/{name}"):
            float(count) for name, count in data_iterator.skip_counts().items()}


def check_tokenizer_fits(config: ml_collections.ConfigDict, task) -> None:
    """Token ids beyond the embedding table would be clamped silently; refuse them instead. A task that decodes
    needs the tokenizer's BOS and EOS to be the ids it starts and stops with."""
    tokenizer = Tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} pieces but "
                          f"model.text.vocab_size is {config.model.text.vocab_size}")
    if hasattr(task, "bos_id") and (tokenizer.require_bos(), tokenizer.eos_id) != (task.bos_id, task.eos_id):
        raise ConfigError(f"tokenizer {config.data.tokenizer} has BOS {tokenizer.bos_id} and EOS {tokenizer.eos_id}; "
                          f"task {config.task!r} needs {task.bos_id} and {task.eos_id} (train it with "
                          "`python -m data_pipelines.tokenizer train`)")


def evaluate_and_log(step: int, params, evaluations: Evaluations, writer: MetricsWriter, final: bool = False
                     ) -> dict[str, float]:
    results = evaluations.run(params, step, final=final)
    if results:
        writer.write(step, results)
        log(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def accept_config(config: ml_collections.ConfigDict, saved_path, allow_changes: set[str]) -> None:
    """On resume: refuses a changed schedule, model or data stream unless allowed, and logs what changed."""
    changes = resume_changes(load_saved_config(saved_path), config)
    check_resume_changes(changes, allow_changes, str(saved_path.parent))
    for key, (old, new) in changes.items():
        log(f"config change on resume: {key} {old!r} -> {new!r}")


def train(config: ml_collections.ConfigDict, workdir: str, preemption: PreemptionNotice,
          allow_changes: set[str] = frozenset()) -> dict[str, Any]:
    """Trains (or resumes) to `config.total_steps`, or to the end of finite data; returns the final evaluation.
    Raises Preempted once a preemption notice's checkpoint is saved.

    Only finite states are saved: a non-finite loss or gradient stops the run (FloatingPointError) before the
    next save. Every exit, error or not, finishes the checkpoint save in flight and stops the data workers.
    """
    goodput = Goodput()  # this process's wall time from here, by cause (vlm_jax/goodput.py)
    root = resolve(workdir)
    root.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.mesh)
    sharding = batch_sharding(mesh, config.sharding_rules)
    ways = data_parallel_size(mesh, config.sharding_rules)
    if config.batch_size % ways:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the data-parallel size {ways}")
    if (config.batch_size // ways) % config.microbatches:
        raise ConfigError(f"microbatches {config.microbatches} must divide the per-device batch "
                          f"{config.batch_size // ways}")
    check_backend(config.model.attention_impl)
    task = get_task(config, mesh)
    check_tokenizer_fits(config, task)
    layout = make_state_layout(task, config, mesh)
    log(f"model: {param_count(layout):,} parameters; mesh {dict(mesh.shape)}")
    log_parameter_table(layout.abstract_state["params"], layout.shardings["params"], mesh.shape["fsdp"],
                        config.mesh.max_replicated_fraction, log)
    manager = checkpoint.make_manager(root, config.keep_checkpoints)
    data_iterator = writer = None
    try:
        start = manager.latest_step() or 0
        if start:
            accept_config(config, root / "config.json", allow_changes)
        data_iterator = make_train_iterator(config)
        evaluations = Evaluations(config, task, layout, mesh, root)
        export = PeriodicExport(config, workdir)
        if start:
            with goodput.timed("checkpoint"):
                state = checkpoint.restore(manager, start, layout.abstract_state, data_iterator)
            log(f"resumed from {manager.directory} at step {start}")
        else:
            state = initialise_from(init_train_state(layout, config.seed), config.init_from, layout, mesh, log,
                                    config.model.scan)
        if jax.process_index() == 0:
            save_config(config, root / "config.json")
        writer = MetricsWriter(root, resumed_step=start, config=config)

        def evaluate(step: int, params) -> dict[str, float]:
            with goodput.timed("evaluation"):
                return evaluate_and_log(step, params, evaluations, writer)

        loop = TrainLoop(config, task, layout, sharding, manager, data_iterator, writer, evaluations.due, evaluate,
                         export, preemption, goodput)
        state, last_step = loop.run(state, start)
        goodput.switch("other")
        with goodput.timed("evaluation"):
            results = evaluate_and_log(last_step, state["params"], evaluations, writer, final=True)
        if jax.process_index() == 0 and results:
            (root / "eval_results.json").write_text(json.dumps({"step": last_step, **results}, indent=2))
        if config.export_every:  # after the final evaluation, so the model card carries its results
            export(last_step, state["params"])
        with goodput.timed("checkpoint"):
            manager.wait_until_finished()
        writer.write(last_step, goodput.totals())
        log(goodput.summary())
        return results
    finally:
        goodput.close()
        checkpoint.finish(manager)
        if writer is not None:
            writer.close()
        if hasattr(data_iterator, "close"):
            data_iterator.close()


class TrainLoop:
    """The steps from `start` to the end: dispatch, log one step late, check health, save, evaluate, stop on a
    preemption notice."""

    def __init__(self, config: ml_collections.ConfigDict, task, layout, sharding, manager, data_iterator,
                 writer: MetricsWriter, eval_due: Callable[[int], bool],
                 evaluate: Callable[[int, Any], dict[str, float]], export: PeriodicExport,
                 preemption: PreemptionNotice, goodput: Goodput):
        self.config, self.manager, self.data_iterator, self.preemption = config, manager, data_iterator, preemption
        self.goodput = goodput
        self.writer, self.eval_due, self.evaluate, self.export = writer, eval_due, evaluate, export
        self.train_step = make_train_step(task, layout, sharding, config.microbatches)
        self.averager, self.health = IntervalAverager(), RunHealth()
        placeholder = zeros_like_batch(task.abstract_batch(config.batch_size // jax.process_count()))
        self.feed = DataFeed(data_iterator, lambda batch: to_global_batch(batch, sharding), placeholder,
                             jax.process_count())

    def run(self, state, start: int):
        """(final state, its step) after training from `start`: `total_steps`, or the last step with data when
        the data ended first."""
        config, pending, metrics = self.config, None, None
        last_step, self.progress = config.total_steps, Progress(config.total_steps, config.batch_size, start)
        self.goodput.switch("step")
        try:
            for step in range(start + 1, config.total_steps + 1):
                with self.goodput.data_wait(metrics):  # data wait only once the previous step has finished
                    batch = self.feed.next(step)
                state, metrics = self.train_step(state, batch)  # Dispatched before the previous
                self.averager.add(metrics)                      # step's metrics are fetched.
                self.health.add(step, metrics)
                if pending is not None:
                    to_write, pending = pending, None
                    self.write_metrics(*to_write)
                if step % config.log_every == 0 or step == config.total_steps:
                    counters = {**data_counters(self.data_iterator), **self.goodput.interval()}
                    pending = (step, self.averager.take(), counters, self.health.snapshot())
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    self.check_health(self.health.snapshot(), step)
                    with self.goodput.timed("checkpoint"):
                        checkpoint.save(self.manager, step, state, self.data_iterator)
                if self.preemption.reached(step) and step < config.total_steps:  # asked at every step
                    if pending is not None:
                        self.write_metrics(*pending)
                    self.save_and_stop(step, state)
                if step < config.total_steps and self.eval_due(step):
                    self.check_health(self.health.snapshot(), step)
                    self.evaluate(step, state["params"])
                if step < config.total_steps and self.export.due(step):
                    self.check_health(self.health.snapshot(), step)
                    with self.goodput.timed("other"):
                        self.export(step, state["params"])
            if pending is not None:
                to_write, pending = pending, None
                self.write_metrics(*to_write)
        except EndOfData as end:
            log(f"{end}; training ends at step {end.last_step}")
            last_step = end.last_step
            if pending is not None and pending[0] <= last_step:  # logged before the data ended
                self.write_metrics(*pending)
            if last_step > start and self.manager.latest_step() != last_step:
                with self.goodput.timed("checkpoint"):
                    checkpoint.save(self.manager, last_step, state, self.data_iterator)
        return state, last_step

    def save_and_stop(self, step: int, state) -> NoReturn:
        """After a preemption notice: logs the steps since the last log line, saves `step` (state and data
        iterator) unless its periodic save is under way, waits for the save, and raises Preempted."""
        print(f"preemption notice (SIGTERM): saving a checkpoint at step {step}", flush=True)  # every process
        taken = self.averager.take()
        if taken:
            counters = {**data_counters(self.data_iterator), **self.goodput.interval()}
            self.write_metrics(step, taken, counters, self.health.snapshot())
        else:
            self.check_health(self.health.snapshot(), step)
        with self.goodput.timed("checkpoint"):
            if self.manager.latest_step() != step:
                checkpoint.save(self.manager, step, state, self.data_iterator)
            self.manager.wait_until_finished()
        print(f"preempted at step {step}: checkpoint saved; exiting {PREEMPTED_EXIT_CODE}", flush=True)
        raise Preempted(step)

    def check_health(self, snapshot, step: int) -> None:
        """Raises FloatingPointError on a non-finite step, EndOfData or the data error when data stopped."""
        record = RunHealth.fetch(snapshot)
        bad, dry = record.first_nonfinite_step, record.first_step_without_data
        if bad and not (dry and dry < bad):
            raise FloatingPointError(f"loss, gradients or parameters are not finite at step {bad}; stopping the run "
                                     f"(no non-finite state is saved; the newest checkpoint is step "
                                     f"{self.manager.latest_step()})")
        if dry:
            if self.feed.error is not None:
                raise self.feed.error
            if record.data_status == FAILED:
                raise DataError(f"another process failed on its training data at step {dry}; see its error")
            whose = "this process's" if self.feed.status == RAN_OUT else "another process's"
            raise EndOfData(dry - 1, f"{whose} training data ran out at step {dry} "
                                     f"(data.num_epochs={self.config.data.num_epochs})")

    def write_metrics(self, step: int, taken: list, counters: dict[str, float], snapshot) -> None:
        """Checks the interval's health, then averages its metrics, writes and prints them."""
        self.check_health(snapshot, step)
        scalars = IntervalAverager.mean(taken)
        for key in ("finite", "data_status"):
            scalars.pop(key, None)
        self.writer.write(step, {**scalars, **counters})
        log(self.progress.line(step, scalars))


@dataclasses.dataclass(frozen=True)
class Command:
    config_spec: str
    workdir: str
    overrides: list[str]
    allow_changes: set[str]
    distributed: DistributedOptions


def parse_args(argv: list[str]) -> Command:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--workdir", required=True, help="local path, gs://bucket/run or s3://bucket/run")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY]",
                        help="on resume, accept a changed config key that alters the schedule, model or data "
                             "(e.g. total_steps); 'all' accepts every change")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process jobs; or VLM_JAX_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, help="or VLM_JAX_NUM_PROCESSES")
    parser.add_argument("--process-id", type=int, help="or VLM_JAX_PROCESS_ID")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.key=value")
        overrides.append(item[len("--config."):])
    allowed = {key.strip() for item in args.allow_change for key in item.split(",") if key.strip()}
    distributed = options_from_env(args.coordinator, args.num_processes, args.process_id)
    return Command(args.config, args.workdir, overrides, allowed, distributed)


def main(argv: list[str] | None = None) -> int:
    command = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    try:
        initialize(command.distributed)
        preemption = PreemptionNotice()
        config = load_config(command.config_spec, command.overrides)
        results = train(config, command.workdir, preemption, command.allow_changes)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except USER_ERRORS as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # grain appends traceback notes
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    log(f"done in {time.perf_counter() - started:.0f}s; metrics, TensorBoard events, checkpoints and "
        f"eval_results.json are in {command.workdir}" + (f"; final eval {json.dumps(results)}" if results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
