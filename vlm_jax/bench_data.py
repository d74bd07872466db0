"""The input-pipeline benchmark (`python -m vlm_jax.bench data`): our grain loader, the raw single-core
decode + transform rate, and optionally open_clip's webdataset loader on the same shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from data_pipelines import input_pipeline, ops
from data_pipelines.webdataset import expand_shards, read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_SAMPLES = 4096


def ensure_bench_data(config) -> None:
    """Writes 256-px synthetic shards and a tokenizer where the config points, if they are missing."""
    data_dir = os.path.dirname(os.path.dirname(config.data.train_shards))
    if not os.path.isdir(os.path.join(data_dir, "train")):
        subprocess.run([sys.executable, "-m", "data_pipelines.make_shards", "synthetic", "--out", data_dir,
                        "--train-samples", str(BENCH_SAMPLES), "--eval-samples", "64", "--image-size", "256",
                        "--samples-per-shard", str(BENCH_SAMPLES // 8), "--jpeg-quality", "95"],
                       cwd=ROOT, check=True, capture_output=True)
    if not os.path.isfile(config.data.tokenizer):
        subprocess.run([sys.executable, "-m", "data_pipelines.tokenizer", "train", "--shards",
                        config.data.train_shards, "--vocab-size", "1000", "--out", config.data.tokenizer],
                       cwd=ROOT, check=True, capture_output=True)


def time_loader(config, batches: int, warmup: int) -> dict:
    """samples/s of the training pipeline (workers, shuffle, decode, transform, batch) after warm-up."""
    options = input_pipeline.from_config(
        config.data, image_size=config.model.image.image_size, text_len=config.model.text.max_len,
        global_batch_size=config.batch_size, seed=config.seed)
    iterator = iter(input_pipeline.make_train_dataset(options))
    try:
        for _ in range(warmup):
            batch = next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    return {"samples_per_s": round(batches * config.batch_size / seconds, 1),
            "workers": input_pipeline.resolve_num_workers(options.num_workers),
            "image_shape": list(batch["image"].shape), "image_dtype": str(batch["image"].dtype)}


def time_single_core(config, samples: int = 512) -> dict:
    """Raw decode + transform rate of one process with no pipeline around it (the per-core ceiling)."""
    records = [r for r in read_shard(expand_shards(config.data.train_shards)[0]) if "image" in r][:samples]
    image_op = ops.build(config.data.pp_train.split("|tokenize")[0])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for record in records:
        image_op(record, rng)
    seconds = time.perf_counter() - start
    mean_bytes = float(np.mean([len(r["image"]) for r in records]))
    return {"single_core_decode_transform_per_s": round(len(records) / seconds, 1),
            "mean_jpeg_kib": round(mean_bytes / 1024, 1)}


def run_peer(python: str, config, batches: int, warmup: int) -> dict:
    """open_clip's get_wds_dataset on the same shards, in its own interpreter (`make peer-env`)."""
    if not os.path.isfile(python):
        raise FileNotFoundError(f"peer interpreter not found: {python} (create it with `make peer-env`)")
    shards = ",".join(expand_shards(config.data.train_shards))
    command = [python, "-m", "vlm_jax.peers.open_clip_data", "--shards", shards,
               "--batch-size", str(config.batch_size), "--workers", str(config.data.num_workers),
               "--image-size", str(config.model.image.image_size), "--batches", str(batches),
               "--warmup", str(warmup), "--num-samples", str(BENCH_SAMPLES)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1200)
    if result.returncode:
        raise RuntimeError(f"open_clip loader failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_data(config, batches: int, warmup: int, peer_python: str | None) -> dict:
    ensure_bench_data(config)
    result = {"bench": "data", "batch_size": config.batch_size, "image_size": config.model.image.image_size,
              "cores": len(os.sched_getaffinity(0)), **time_single_core(config),
              **time_loader(config, batches, warmup)}
    if peer_python:
        peer = run_peer(peer_python, config, batches, warmup)
        result.update({f"open_clip_{key}": value for key, value in peer.items() if key != "peer"})
        result["speedup_vs_open_clip"] = round(result["samples_per_s"] / peer["samples_per_s"], 2)
    return result
