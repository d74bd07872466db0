"""Writes webdataset tar shards.

    python -m data_pipelines.make_shards synthetic --out DIR [--train-samples 20000] [--eval-samples 2400]

`synthetic` writes DIR/train/*.tar, DIR/eval/*.tar (a held-out split: new images of the same classes),
DIR/classnames.json and DIR/templates.json for zero-shot evaluation, and a sizes.json per split.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys

import numpy as np

from data_pipelines import synthetic
from data_pipelines.shard_writer import write_shard, write_sizes

SPLIT_SEEDS = {"train": 0, "eval": 1}


def encode_jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_synthetic_shard(job: tuple) -> tuple[str, int]:
    """One shard of the synthetic set; the content depends only on (seed, split, shard index)."""
    out_dir, split, shard_index, first, count, image_size, quality, seed = job
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], shard_index])
    num_classes = len(synthetic.class_names())
    samples = []
    for index in range(first, first + count):
        label = index % num_classes if split == "eval" else int(rng.integers(num_classes))
        image, caption = synthetic.make_example(rng, label, image_size)
        meta = {"label": label, "classname": synthetic.class_names()[label]}
        samples.append((f"{index:09d}", encode_jpeg(image, quality), caption, meta))
    name = f"{shard_index:05d}.tar"
    return name, write_shard(os.path.join(out_dir, name), samples)


def make_synthetic(args: argparse.Namespace) -> None:
    jobs = []
    for split, total in (("train", args.train_samples), ("eval", args.eval_samples)):
        split_dir = os.path.join(args.out, split)
        os.makedirs(split_dir, exist_ok=True)
        for shard_index, first in enumerate(range(0, total, args.samples_per_shard)):
            count = min(args.samples_per_shard, total - first)
            jobs.append((split_dir, split, shard_index, first, count, args.image_size, args.jpeg_quality,
                         args.seed))
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        written = pool.map(write_synthetic_shard, jobs)
    for split in ("train", "eval"):
        split_dir = os.path.join(args.out, split)
        write_sizes(split_dir, {name: n for job, (name, n) in zip(jobs, written) if job[0] == split_dir})
    with open(os.path.join(args.out, "classnames.json"), "w") as f:
        json.dump(synthetic.class_names(), f)
    with open(os.path.join(args.out, "templates.json"), "w") as f:
        json.dump(synthetic.ZERO_SHOT_TEMPLATES, f)
    print(f"wrote {args.train_samples} train and {args.eval_samples} eval samples "
          f"({len(synthetic.class_names())} classes) to {args.out}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True)
    synth = sources.add_parser("synthetic", help="coloured shapes at positions with varied captions")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-samples", type=int, default=20_000)
    synth.add_argument("--eval-samples", type=int, default=2_400)
    synth.add_argument("--image-size", type=int, default=32)
    synth.add_argument("--samples-per-shard", type=int, default=1_000)
    synth.add_argument("--jpeg-quality", type=int, default=90)
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train_samples", "eval_samples", "image_size", "samples_per_shard"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be in 1..100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    make_synthetic(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
