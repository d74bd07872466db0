"""Training entry point: one loop for every objective.

    python -m vlm_jax.train --config=configs/demo/siglip_tiny.py --workdir=DIR [--config.key=value ...]

Re-running the same command resumes from the newest complete checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from data_pipelines import input_pipeline
from data_pipelines.samples import DataError
from data_pipelines.tokenizer import Tokenizer
from vlm_jax import checkpoint
from vlm_jax.config import ConfigError, load_config, save_config
from vlm_jax.evaluate import (EvalData, Embedders, eval_batch_size, load_eval_data, make_embedders,
                              run_evaluators)
from vlm_jax.kernels.attention import check_backend
from vlm_jax.metrics import IntervalAverager, MetricsWriter, Progress
from vlm_jax.parallel.distributed import DistributedOptions, initialize, options_from_env
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.param_table import log_parameter_table
from vlm_jax.parallel.sharding import batch_sharding, data_parallel_size, to_global_batch
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout, param_count
from vlm_jax.train_step import make_train_step

USER_ERRORS = (ConfigError, checkpoint.CheckpointMismatchError, FileNotFoundError, ValueError, DataError)


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


def data_counters(data_iterator) -> dict[str, float]:
    """data/shards (shards opened) and data/skipped/<reason> totals of this process's input."""
    return {("data/shards" if name == "shards" else f"data/skipped/{name}"): float(count)
            for name, count in data_iterator.skip_counts().items()}


def check_tokenizer_fits(config: ml_collections.ConfigDict) -> None:
    """Token ids beyond the embedding table would be clamped silently; refuse them instead."""
    pieces = Tokenizer(config.data.tokenizer).vocab_size
    if pieces > config.model.text.vocab_size:
        raise ConfigError(f"tokenizer {config.data.tokenizer} has {pieces} pieces but "
                          f"model.text.vocab_size is {config.model.text.vocab_size}")


def evaluate_and_log(step, embedders: Embedders, params, eval_data: EvalData | None, sharding, batch_size,
                     writer: MetricsWriter) -> dict[str, float]:
    if eval_data is None:
        return {}
    results = run_evaluators(embedders, params, eval_data, sharding, batch_size)
    writer.write(step, results)
    log(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) to `config.total_steps`; returns the final evaluation results."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh)
    sharding = batch_sharding(mesh, config.sharding_rules)
    ways = data_parallel_size(mesh, config.sharding_rules)
    if config.batch_size % ways:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the data-parallel size {ways}")
    check_tokenizer_fits(config)
    check_backend(config.model.attention_impl)
    task = get_task(config, mesh)
    layout = make_state_layout(task, config, mesh)
    log(f"model: {param_count(layout):,} parameters; mesh {dict(mesh.shape)}")
    log_parameter_table(layout.abstract_state["params"], layout.shardings["params"], mesh.shape["fsdp"],
                        config.mesh.max_replicated_fraction, log)
    data_iterator = make_train_iterator(config)
    eval_data = load_eval_data(config)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    start = manager.latest_step() or 0
    if start:
        state = checkpoint.restore(manager, start, layout.abstract_state, data_iterator)
        log(f"resumed from {manager.directory} at step {start}")
    else:
        state = init_train_state(layout, config.seed)
    if jax.process_index() == 0:
        save_config(config, os.path.join(workdir, "config.json"))
    if (config.batch_size // ways) % config.microbatches:
        raise ConfigError(f"microbatches {config.microbatches} must divide the per-device batch "
                          f"{config.batch_size // ways}")
    train_step = make_train_step(task, layout, sharding, config.microbatches)
    writer = MetricsWriter(workdir, resumed_step=start)
    averager, progress = IntervalAverager(), Progress(config.total_steps, config.batch_size, start)
    eval_size, embedders = eval_batch_size(config, sharding), make_embedders(task, layout, mesh)

    def evaluate(step: int, params) -> dict[str, float]:
        return evaluate_and_log(step, embedders, params, eval_data, sharding, eval_size, writer)

    to_write = None
    for step in range(start + 1, config.total_steps + 1):
        batch = to_global_batch(next(data_iterator), sharding)
        state, metrics = train_step(state, batch)  # Dispatched before the previous metrics are fetched.
        averager.add(metrics)
        if to_write is not None:
            write_metrics(*to_write, writer, progress)
            to_write = None
        if step % config.log_every == 0 or step == config.total_steps:
            to_write = (step, averager.take(), data_counters(data_iterator))
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            checkpoint.save(manager, step, state, data_iterator)
        if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
            evaluate(step, state["params"])
    if to_write is not None:
        write_metrics(*to_write, writer, progress)
    manager.wait_until_finished()
    results = evaluate(config.total_steps, state["params"])
    if jax.process_index() == 0 and results:
        with open(os.path.join(workdir, "eval_results.json"), "w") as f:
            json.dump({"step": config.total_steps, **results}, f, indent=2)
    writer.close()
    manager.close()
    if hasattr(data_iterator, "close"):
        data_iterator.close()
    return results


def write_metrics(step: int, taken: list, counters: dict[str, float], writer: MetricsWriter,
                  progress: Progress) -> None:
    """Averages an interval's metrics, stops the run on a non-finite loss, writes and prints them."""
    scalars = IntervalAverager.mean(taken)
    if not math.isfinite(scalars["loss"]):
        raise FloatingPointError(f"loss is {scalars['loss']} at step {step}; stopping the run")
    writer.write(step, {**scalars, **counters})
    log(progress.line(step, scalars))


def parse_args(argv: list[str]) -> tuple[str, str, list[str], DistributedOptions]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process jobs; or VLM_JAX_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, help="or VLM_JAX_NUM_PROCESSES")
    parser.add_argument("--process-id", type=int, help="or VLM_JAX_PROCESS_ID")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.key=value")
        overrides.append(item[len("--config."):])
    distributed = options_from_env(args.coordinator, args.num_processes, args.process_id)
    return args.config, args.workdir, overrides, distributed


def main(argv: list[str] | None = None) -> int:
    config_spec, workdir, overrides, distributed = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    try:
        initialize(distributed)
        config = load_config(config_spec, overrides)
        results = train(config, workdir)
    except USER_ERRORS as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # grain appends traceback notes
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    log(f"done in {time.perf_counter() - started:.0f}s; metrics, TensorBoard events, checkpoints and "
        f"eval_results.json are in {workdir}" + (f"; final eval {json.dumps(results)}" if results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
