"""Benchmarks; each prints one JSON line.

    python -m vlm_jax.bench step --config=configs/bench/siglip_s16.py [--steps=10] [--config.key=value ...]
        [--peer=open_clip --peer-python=.venv-peer/bin/python]
    python -m vlm_jax.bench data --config=configs/bench/data_256.py [--batches=60 --warmup=10]
        [--peer=open_clip --peer-python=.venv-peer/bin/python]
    python -m vlm_jax.bench compile --config=configs/bench/siglip_s16.py --topology=v5p-256 [--config.key=value]
        (exit code 1 when the step does not fit the chip's HBM)
    python -m vlm_jax.bench attention [--lengths=1024,4096,16384] [--mask=causal] [--dtype=bfloat16]
    python -m vlm_jax.bench vmem [--lengths=16384,32768]      (TPU flash kernels' VMEM, from the TPU compiler)
    python -m vlm_jax.bench decode --config=configs/demo/cappa_tiny.py [--tokens=32 --batch=32]
        (caption decoding with the KV cache vs recomputing the prefix at every token)
    python -m vlm_jax.bench packing [--data=demo_out/data --image-tokens=16 --text-len=32 --pack-images=4]
        (real tokens per row and per step of VLM rows, packed vs one example per row: the demo data and a
        long-tailed caption-length distribution with 256 image tokens)

With --peer, the peer (its train step, or its webdataset loader on the same shards) is timed right after ours
in the same run (in its own Python environment, see `make peer-env`) and the ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.bench_attention import MASKS, bench_attention
from vlm_jax.bench_compile import bench_compile, does_not_fit
from vlm_jax.bench_vmem import bench_vmem
from vlm_jax.config import ConfigError, load_config
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import batch_sharding, to_global_batch
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout, param_count
from vlm_jax.train_step import make_train_step


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large float32 matmul on the default device: the peak for MFU."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return 2 * n**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    size, length = config.model.image.image_size, config.model.text.max_len
    return {
        "image": rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32),
        "text": rng.integers(0, config.model.text.vocab_size, (config.batch_size, length)).astype(np.int32),
    }


def bench_step(config, steps: int) -> dict:
    """Median train-step time, throughput and MFU for `config` on synthetic inputs."""
    mesh = make_mesh(config.mesh)
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = get_task(config, mesh)
    layout = make_state_layout(task, config, mesh)
    state = init_train_state(layout, config.seed)
    train_step = make_train_step(task, layout, sharding)
    batch = to_global_batch(synthetic_batch(config, np.random.default_rng(0)), sharding)
    compile_start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    holder = {"state": state}

    def one_step():
        holder["state"], m = train_step(holder["state"], batch)
        jax.block_until_ready(m)

    step_s = median_seconds(one_step, steps)
    peak = matmul_peak_flops()
    flops_per_sample = task.train_flops_per_sample()
    achieved = flops_per_sample * config.batch_size / step_s
    return {
        "bench": "step", "backend": jax.default_backend(), "devices": jax.device_count(),
        "params": param_count(layout), "batch_size": config.batch_size, "first_step_s": round(compile_s, 2),
        "median_step_s": round(step_s, 4), "samples_per_s": round(config.batch_size / step_s, 2),
        "model_flops_per_sample": flops_per_sample, "achieved_flops_per_s": round(achieved),
        "peak_matmul_flops_per_s": round(peak), "mfu": round(achieved / peak, 4),
    }


def run_peer(peer: str, python: str, batch_size: int, steps: int) -> dict:
    """Times the peer's step in its own interpreter; returns its JSON line."""
    if not os.path.isfile(python):
        raise FileNotFoundError(f"peer interpreter not found: {python} (create it with `make peer-env`)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [python, "-m", f"vlm_jax.peers.{peer}_step", "--batch-size", str(batch_size), "--steps", str(steps)],
        cwd=root, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"peer {peer} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("step", help="train-step time, samples/s and MFU")
    step.add_argument("--config", required=True)
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--peer", choices=["open_clip"])
    step.add_argument("--peer-python", default=".venv-peer/bin/python")
    data = commands.add_parser("data", help="input pipeline samples/s (and the single-core decode rate)")
    data.add_argument("--config", required=True)
    data.add_argument("--batches", type=int, default=60)
    data.add_argument("--warmup", type=int, default=10)
    data.add_argument("--peer", choices=["open_clip"])
    data.add_argument("--peer-python", default=".venv-peer/bin/python")
    compile_ = commands.add_parser("compile", help="per-device memory of the train step on a TPU topology")
    compile_.add_argument("--config", required=True)
    compile_.add_argument("--topology", required=True, help="e.g. v5p-256, v5e-16, v6e-256, or v5p:4x4x8")
    attention = commands.add_parser("attention", help="attention time and memory per implementation")
    attention.add_argument("--lengths", default="1024,4096,16384")
    attention.add_argument("--mask", choices=MASKS, default="full")
    attention.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                           help="default: float32 on CPU, bfloat16 on accelerators")
    vmem = commands.add_parser("vmem", help="VMEM of the TPU flash kernels per generation, from the TPU compiler")
    vmem.add_argument("--lengths", default="16384,32768")
    decode = commands.add_parser("decode", help="cached vs recomputed caption decoding, tokens/s")
    decode.add_argument("--config", required=True)
    decode.add_argument("--tokens", type=int, default=32)
    decode.add_argument("--batch", type=int, default=32)
    decode.add_argument("--repeats", type=int, default=3)
    packing = commands.add_parser("packing", help="VLM rows: real tokens per row and step, packed vs unpacked")
    packing.add_argument("--data", default="demo_out/data", help="make_shards synthetic output with spm.model")
    packing.add_argument("--image-tokens", type=int, default=16)
    packing.add_argument("--text-len", type=int, default=32)
    packing.add_argument("--pack-images", type=int, default=4)
    packing.add_argument("--rows", type=int, default=32, help="rows per step")
    packing.add_argument("--examples", type=int, default=1024, help="demo examples measured")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "packing":
        from vlm_jax.bench_packing import bench_packing  # the input pipeline's packages only here
        print(json.dumps(bench_packing(args.data, args.image_tokens, args.text_len, args.pack_images, args.rows,
                                       args.examples)), flush=True)
        return 0
    if args.command == "vmem":
        print(json.dumps(bench_vmem([int(n) for n in args.lengths.split(",")])), flush=True)
        return 0
    if args.command == "attention":
        lengths = [int(n) for n in args.lengths.split(",")]
        print(json.dumps(bench_attention(lengths, args.mask, args.dtype)), flush=True)
        return 0
    overrides = [item[len("--config."):] for item in rest if item.startswith("--config.")]
    if len(overrides) != len(rest):
        parser.error(f"unrecognised arguments {rest}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "compile":
        try:
            report = bench_compile(args.config, overrides, args.topology)
        except (ConfigError, ValueError, RuntimeError) as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(json.dumps({"config": args.config, **report}), flush=True)
        verdict = does_not_fit(report)
        if verdict:
            print(f"error: {verdict}", file=sys.stderr)
            return 1
        return 0
    if args.command == "decode":
        from vlm_jax.bench_decode import bench_decode
        try:
            report = bench_decode(config, args.tokens, args.batch, args.repeats)
        except ValueError as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(json.dumps({"config": args.config, **report}), flush=True)
        return 0
    if args.command == "data":
        from vlm_jax.bench_data import bench_data  # the input pipeline's packages (grain, OpenCV) only here
        peer_python = args.peer_python if args.peer else None
        print(json.dumps({"config": args.config, **bench_data(config, args.batches, args.warmup, peer_python)}),
              flush=True)
        return 0
    result = {"config": args.config, **bench_step(config, args.steps)}
    if args.peer:
        peer = run_peer(args.peer, args.peer_python, config.batch_size, args.steps)
        result.update({f"{args.peer}_{key}": value for key, value in peer.items() if key != "peer"})
        result[f"speedup_vs_{args.peer}"] = round(peer["median_step_s"] / result["median_step_s"], 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
