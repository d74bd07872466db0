"""Captions for a folder of images or webdataset shards, from a workdir's newest checkpoint, with the KV cache.

    python -m vlm_jax.generate --workdir=DIR --images=FOLDER_OR_SHARDS [--beam=4 | --top-p=0.9] [--out=FILE]
    python -m vlm_jax.generate --workdir=VLM_DIR --images=... --prompt="what shape?"

A decoder-only VLM answers `--prompt` (default: its captioning prompt) after each image. Greedy by default; `--beam` > 1 runs beam search, `--temperature` / `--top-k` / `--top-p` sample. Writes one JSON
line per image ({"key", "caption"}, plus "references" when the shards have captions) to --out (default
DIR/generated.jsonl) and prints a few.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import ml_collections

from data_pipelines import eval_split
from data_pipelines.tokenizer import Tokenizer
from vlm_jax import checkpoint
from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.decoding import SamplingConfig
from vlm_jax.evaluate import USER_ERRORS
from vlm_jax.evaluators.common import apply_in_batches
from vlm_jax.evaluators.data import eval_preprocessing
from vlm_jax.evaluators.predict import DecodeSettings, make_caption_decoder, require
from vlm_jax.evaluators.registry import eval_batch_size
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import batch_sharding
from vlm_jax.tasks import get_task
from vlm_jax.train_state import make_state_layout
from vlm_jax.workdir import resolve


def image_source(images: str) -> str:
    """A folder of .tar shards -> their glob; another folder -> "folder:DIR"; anything else (a shard spec,
    "tfds:...", "csv:...", "folder:...") as given."""
    if os.path.isdir(images):
        if any(name.endswith(".tar") for name in os.listdir(images)):
            return os.path.join(images, "*.tar")
        return f"folder:{images}"
    return images


def caption_images(config: ml_collections.ConfigDict, workdir: str, images: str, settings: DecodeSettings,
                   prompt: str | None = None) -> tuple[int, list[dict]]:
    """(checkpoint step, one record per image) for the newest checkpoint in `workdir`."""
    mesh = make_mesh(config.mesh)
    task = get_task(config)
    require(task, config, "decode", "vlm_jax.generate")
    if prompt is not None and not getattr(task, "takes_prompt", False):
        raise ConfigError(f"--prompt needs a decoder-only VLM (task 'vlm'); this workdir's task is {config.task!r}")
    layout = make_state_layout(task, config, mesh)
    if settings.max_new_tokens is None:
        settings = dataclasses.replace(settings, max_new_tokens=task.max_decode_len())
    decode = make_caption_decoder(task, layout, mesh, settings, prompt)  # a bad length fails before anything loads
    split = eval_split.load_eval_split(image_source(images), config.data.tokenizer,
                                       image_size=config.model.image.image_size,
                                       text_len=config.model.text.max_len, pp=eval_preprocessing(config))
    step, params = checkpoint.restore_newest_params(workdir, config.keep_checkpoints, layout.abstract_state)
    sharding = batch_sharding(mesh, config.sharding_rules)
    batches = iter(range(len(split["image"])))  # each batch samples with its own key
    tokens = apply_in_batches(lambda image: decode(params, image, next(batches)), split["image"],
                              eval_batch_size(config, sharding), sharding)
    tokenizer = Tokenizer(config.data.tokenizer)
    records = []
    for key, row, references in zip(split["key"], tokens, split["captions"]):
        record = {"key": key, "caption": tokenizer.decode(row)}
        if references:
            record["references"] = references
        records.append(record)
    return step, records


def parse_settings(args: argparse.Namespace) -> DecodeSettings:
    """The decoding flags; max_new_tokens None stands for the task's longest answer."""
    if args.beam > 1 and (args.temperature or args.top_k or args.top_p < 1):
        raise ConfigError("--beam and sampling (--temperature / --top-k / --top-p) exclude each other")
    temperature = args.temperature if args.temperature is not None else (1.0 if args.top_k or args.top_p < 1
                                                                         else 0.0)
    return DecodeSettings(
        max_new_tokens=args.max_new_tokens,
        beam=args.beam,
        length_penalty=args.length_penalty, seed=args.seed,
        sampling=SamplingConfig(temperature=temperature, top_k=args.top_k, top_p=args.top_p))


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the JSONL written; 2 (one `error:` line) for bad input."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--images", required=True, help="a folder of images, a folder of .tar shards, a shard spec")
    parser.add_argument("--out", help="JSONL file (default WORKDIR/generated.jsonl)")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("--temperature", type=float, help="default 0 (greedy), or 1 with --top-k / --top-p")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's text length")
    parser.add_argument("--prompt", help="a VLM's prompt after each image (default: its captioning prompt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="captions printed")
    args = parser.parse_args(argv)
    try:
        config = load_saved_config(resolve(args.workdir) / "config.json")
        settings = parse_settings(args)
        step, records = caption_images(config, args.workdir, args.images, settings, args.prompt)
    except USER_ERRORS as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        out = resolve(args.out) if args.out else resolve(args.workdir) / "generated.jsonl"
        out.write_text("".join(json.dumps(record) + "\n" for record in records))
        what = f"answers to {args.prompt!r}" if args.prompt else "captions"
        print(f"{len(records)} {what} from step {step} ({settings.describe()}) written to {out}")
        for record in records[:args.show]:
            print(f"  {record['key']}: {record['caption']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
