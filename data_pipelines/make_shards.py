"""Writes webdataset tar shards.

    python -m data_pipelines.make_shards synthetic --out DIR [--train-samples 20000] [--eval-samples 2400]
    python -m data_pipelines.make_shards folder --root IMAGES --out DIR [--labels-from-dirs]
    python -m data_pipelines.make_shards csv --csv FILE --out DIR [--csv-img-key filepath]
        [--csv-caption-key caption] [--csv-separator SEP]

`synthetic` writes DIR/train/*.tar, DIR/eval/*.tar (a held-out split: new images of the same classes; each
sample's .json has label, classname "<colour> <shape>", colour and shape), DIR/classnames.json and
DIR/templates.json for zero-shot evaluation, and a sizes.json per split.
`folder` (images with captions in .txt files beside them) and `csv` (image paths and captions) write
DIR/{00000..}.tar and DIR/sizes.json, plus DIR/classnames.json with --labels-from-dirs; both take
[--samples-per-shard 1000] [--shuffle-seed S] [--resize-max N] [--overwrite]. Samples whose files cannot be
read, captions that are not UTF-8, images PIL cannot read and formats other than JPEG, PNG and WebP are skipped
and counted. DIR/progress.json records the settings and each finished shard: the same command run again over
an interrupted run's folder resumes it (finished shards are kept); --overwrite replaces earlier shards.
A worker process that dies (killed by the OS) ends the run with one line; *.partial files never remain.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import io
import json
import multiprocessing
import os
import struct
import sys
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.shard_writer import ShardSample, write_shard, write_sizes

SPLIT_SEEDS = {"train": 0, "eval": 1}
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what shard readers decode
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
RESIZE_JPEG_QUALITY = 95
PROGRESS_FILE = "progress.json"

if TYPE_CHECKING:
    import grain


def encode_jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its shard (killed by the OS, out of memory)."""


def run_in_workers(function: Callable, jobs: list, initializer: Callable | None = None,
                   initargs: tuple = ()) -> Iterator[tuple]:
    """(job, function(job)) for every job, in the order they finish, from spawned worker processes.

    A worker that dies raises WorkerDied at once, instead of waiting for ever on its lost task.
    """
    if not jobs:
        return
    pool = concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1),
                                                  multiprocessing.get_context("spawn"), initializer, initargs)
    try:
        futures = {pool.submit(function, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool:
        raise WorkerDied("a worker process died (killed by the OS? out of memory?)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def remove_partial_files(directory: str) -> None:
    """Deletes the *.partial files shard writers leave when they are killed."""
    for path in glob.glob(os.path.join(glob.escape(directory), "*.partial")):
        os.remove(path)


def write_synthetic_shard(job: tuple) -> tuple[str, int]:
    """One shard of the synthetic set; the content depends only on (seed, split, shard index)."""
    out_dir, split, shard_index, first, count, image_size, quality, seed = job
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], shard_index])
    num_classes = len(synthetic.class_names())
    samples = []
    for index in range(first, first + count):
        label = index % num_classes if split == "eval" else int(rng.integers(num_classes))
        image, caption = synthetic.make_example(rng, label, image_size)
        classname = synthetic.class_names()[label]
        colour, shape = classname.split(" ")
        meta = {"label": label, "classname": classname, "colour": colour, "shape": shape}
        samples.append(ShardSample(f"{index:09d}", encode_jpeg(image, quality), "jpg", caption, meta))
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
    try:
        written = dict(run_in_workers(write_synthetic_shard, jobs))
    finally:
        for split in SPLIT_SEEDS:
            remove_partial_files(os.path.join(args.out, split))
    written = [written[job] for job in jobs]
    for split in ("train", "eval"):
        split_dir = os.path.join(args.out, split)
        write_sizes(split_dir, {name: n for job, (name, n) in zip(jobs, written) if job[0] == split_dir})
    with open(os.path.join(args.out, "classnames.json"), "w") as f:
        json.dump(synthetic.class_names(), f)
    with open(os.path.join(args.out, "templates.json"), "w") as f:
        json.dump(synthetic.ZERO_SHOT_TEMPLATES, f)
    print(f"wrote {args.train_samples} train and {args.eval_samples} eval samples "
          f"({len(synthetic.class_names())} classes) to {args.out}")


class SkippedImage(Exception):
    """An image left out of the shards; the message is the reason counted in the summary."""


def prepare_image(data: bytes, resize_max: int | None) -> tuple[bytes, str, dict]:
    """(bytes to store, member extension, sizes); an image whose longer side exceeds resize_max becomes a JPEG
    of that size. Raises SkippedImage for bytes PIL cannot read and for formats other than JPEG, PNG, WebP."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:  # verify() leaves an image unusable
            if image.format not in FORMAT_EXTENSIONS:
                raise SkippedImage("unsupported_format")
            width, height = image.size
            sizes = {"width": width, "height": height, "original_width": width, "original_height": height}
            if resize_max is None or max(width, height) <= resize_max:
                return data, FORMAT_EXTENSIONS[image.format], sizes
            scale = resize_max / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image.draft("RGB", size)  # JPEG: decode at a reduced scale that is still at least `size`
            resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    except PIL_ERRORS as e:
        raise SkippedImage("corrupt_image") from e
    sizes["width"], sizes["height"] = size
    return encode_jpeg(resized, RESIZE_JPEG_QUALITY), "jpg", sizes


_source: grain.MapDataset | None = None  # the raw samples, set in each pool worker by use_source


def use_source(dataset: grain.MapDataset) -> None:
    global _source
    _source = dataset


def write_source_shard(job: tuple[str, int, int, int, int | None]) -> tuple[str, int, Counter]:
    """Shard `shard_index` of the source: samples [first, first + count), keyed by their 9-digit index."""
    out_dir, shard_index, first, count, resize_max = job
    samples, skipped = [], Counter()
    for index in range(first, first + count):
        try:
            raw = _source[index]
        except UnicodeDecodeError:  # a caption file that is not UTF-8
            skipped["caption_not_utf8"] += 1
            continue
        except OSError:  # an image or caption file that vanished or cannot be read
            skipped["unreadable_file"] += 1
            continue
        try:
            image, extension, sizes = prepare_image(raw["image"], resize_max)
        except SkippedImage as e:
            skipped[str(e)] += 1
            continue
        meta = {"path": raw["path"], **sizes, **({"label": raw["label"]} if "label" in raw else {})}
        samples.append(ShardSample(f"{index:09d}", image, extension, raw.get("caption"), meta))
    name = f"{shard_index:05d}.tar"
    return name, write_shard(os.path.join(out_dir, name), samples), skipped


def open_source(args: argparse.Namespace) -> tuple[grain.MapDataset, list[str] | None]:
    """The raw samples of the `folder` or `csv` subcommand, and the class names if labels come from folders."""
    from data_pipelines.folder_source import csv_samples, folder_classes, folder_samples  # grain: 2+ s to import
    if args.source == "folder":
        classes = folder_classes(args.root) if args.labels_from_dirs else None
        return folder_samples(args.root, args.labels_from_dirs), classes
    return csv_samples(args.csv, args.csv_img_key, args.csv_caption_key, args.csv_separator), None


def source_settings(args: argparse.Namespace, total: int) -> dict:
    """What decides the shards' content: a resumed run must have the same."""
    settings = {name: value for name, value in sorted(vars(args).items()) if name not in ("out", "overwrite")}
    return {**settings, "samples": total}


def finished_shards(out: str, settings: dict, overwrite: bool) -> dict[str, dict]:
    """Shards an earlier run with these settings finished (kept), after removing what must be rewritten.

    Raises ValueError if `out` holds shards that this command did not write and `overwrite` is off.
    """
    progress_path = os.path.join(out, PROGRESS_FILE)
    shards = glob.glob(os.path.join(glob.escape(out), "*.tar"))
    progress = {}
    if os.path.isfile(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
    if overwrite or progress.get("settings") != settings:
        if shards and not overwrite:
            why = "written with other settings" if progress else "not written by make_shards"
            raise ValueError(f"{out} already holds .tar shards {why}; pass --overwrite to replace them or write to "
                             "an empty folder")
        progress = {}
    finished = {name: shard for name, shard in progress.get("shards", {}).items()
                if os.path.isfile(os.path.join(out, name))}
    for path in shards:
        if os.path.basename(path) not in finished:
            os.remove(path)
    return finished


def save_progress(out: str, settings: dict, finished: dict[str, dict]) -> None:
    """Writes DIR/progress.json atomically."""
    path = os.path.join(out, PROGRESS_FILE)
    with open(f"{path}.partial", "w") as f:
        json.dump({"settings": settings, "shards": dict(sorted(finished.items()))}, f, indent=1)
    os.replace(f"{path}.partial", path)


def make_from_source(dataset: grain.MapDataset, classes: list[str] | None, args: argparse.Namespace) -> None:
    """Writes the samples to args.out in shards of args.samples_per_shard, one worker task per shard; resumes
    the shards an interrupted run with the same settings left unfinished."""
    os.makedirs(args.out, exist_ok=True)
    if args.shuffle_seed is not None:
        dataset = dataset.shuffle(seed=args.shuffle_seed)
    total, per_shard = len(dataset), args.samples_per_shard
    settings = source_settings(args, total)
    finished = finished_shards(args.out, settings, args.overwrite)
    kept = len(finished)
    remove_partial_files(args.out)  # left by a run that was killed
    jobs = [(args.out, shard_index, first, min(per_shard, total - first), args.resize_max)
            for shard_index, first in enumerate(range(0, total, per_shard))
            if f"{shard_index:05d}.tar" not in finished]
    save_progress(args.out, settings, finished)
    try:
        for _, (name, count, skipped) in run_in_workers(write_source_shard, jobs, use_source, (dataset,)):
            finished[name] = {"samples": count, "skipped": dict(skipped)}
            save_progress(args.out, settings, finished)
    finally:
        remove_partial_files(args.out)
    write_sizes(args.out, {name: shard["samples"] for name, shard in finished.items()})
    if classes is not None:
        with open(os.path.join(args.out, "classnames.json"), "w") as f:
            json.dump(classes, f)
    skipped = sum((Counter(shard["skipped"]) for shard in finished.values()), Counter())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
    resumed = f" ({kept} kept from an earlier run)" if kept else ""
    print(f"wrote {sum(shard['samples'] for shard in finished.values())} samples in {len(finished)} shards"
          f"{resumed} to {args.out}; skipped {skipped.total()}" + (f" ({reasons})" if reasons else ""))


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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True)
    common.add_argument("--samples-per-shard", type=int, default=1_000)
    common.add_argument("--shuffle-seed", type=int, help="shuffle the samples before sharding (default: in order)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace shards already in --out (default: resume a run with the same settings)")
    common.add_argument("--resize-max", type=int, metavar="N",
                        help=f"re-encode images whose longer side exceeds N as JPEG (quality "
                             f"{RESIZE_JPEG_QUALITY}) at N, aspect kept (default: store the original bytes)")
    folder = sources.add_parser("folder", parents=[common], help="images with captions in .txt files beside them")
    folder.add_argument("--root", required=True, help="folder searched recursively for .jpg/.jpeg/.png/.webp")
    folder.add_argument("--labels-from-dirs", action="store_true",
                        help="root/<class>/<image>: label = index of <class> among the sorted subfolders")
    table = sources.add_parser("csv", parents=[common], help="a CSV/TSV with image path and caption columns")
    table.add_argument("--csv", required=True, help="relative image paths are resolved from the file's folder")
    table.add_argument("--csv-img-key", default="filepath")
    table.add_argument("--csv-caption-key", default="caption")
    table.add_argument("--csv-separator", help="one character, or \\t (default: tab for .tsv, comma otherwise)")
    args = parser.parse_args(argv)
    for name in ("train_samples", "eval_samples", "image_size", "samples_per_shard", "resize_max"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.source == "synthetic" and not 1 <= args.jpeg_quality <= 100:
        parser.error("--jpeg-quality must be in 1..100")
    if args.source == "csv" and args.csv_separator is not None:
        args.csv_separator = {"\\t": "\t"}.get(args.csv_separator, args.csv_separator)
        if len(args.csv_separator) != 1:
            parser.error("--csv-separator must be one character (or \\t)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.source == "synthetic":
            make_synthetic(args)
        else:
            dataset, classes = open_source(args)
            make_from_source(dataset, classes, args)
    except (FileNotFoundError, ValueError) as e:  # bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WorkerDied, OSError) as e:
        print(f"error: {e}; run the same command again to finish", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
