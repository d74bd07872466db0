"""Held-out splits loaded whole into host memory, and tokenized zero-shot class prompts."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from data_pipelines import ops
from data_pipelines.preprocess import PreprocessIterDataset
from data_pipelines.samples import DataError
from data_pipelines.sources import raw_eval_samples
from data_pipelines.tokenizer import Tokenizer

# Ops that set the pixel value range; the default eval spec repeats training's, so both see the same inputs.
VALUE_RANGE_OPS = ("value_range", "normalize")
# Captions are tokenized here (every reference caption, to the model's length), not by the image spec.
TEXT_OPS = ("tokenize", "keep", "lower")


def default_pp_eval(image_size: int, pp_train: str = "", crop: bool = True) -> str:
    """transformers' image preprocessing, pixel for pixel (so exported models see what evaluation saw): a full
    decode, Pillow's bicubic resize of the short side to image_size and the centre crop (CLIP / SigLIP
    processors), or with crop=False of the whole image to a square (PaliGemma's); then the value-range ops of
    `pp_train` (none: uint8, which the model maps to [-1, 1] itself, as for the default training spec)."""
    value_ops = [item.strip() for item in pp_train.split("|")
                 if item.strip() and ops.parse_spec(item)[0][0] in VALUE_RANGE_OPS]
    geometry = (f"resize_small({image_size}, method='bicubic')|center_crop({image_size})" if crop
                else f"resize({image_size}, method='bicubic')")
    return "|".join(["decode", geometry, *value_ops])


def build_image_op(spec: str) -> ops.Op:
    """The image op of an eval spec; a one-line ValueError for text ops (captions are tokenized separately)."""
    text_ops = [name for name, _, _ in ops.parse_spec(spec) if name in TEXT_OPS]
    if text_ops:
        raise ValueError(f"eval preprocessing {spec!r} is an image spec: drop {', '.join(text_ops)} (every "
                         f"reference caption is tokenized to the model's text length)")
    return ops.build(spec)


def sample_name(sample: dict, folder: bool) -> str:
    """How outputs name a sample: for a folder source the image file's path relative to the folder (e.g.
    "cats/1.jpg"), otherwise its key (the webdataset `__key__`, a CSV row index, a tfds split/index)."""
    if folder:
        return os.path.relpath(sample["path"], sample["__source__"]).replace(os.sep, "/")
    return sample.get("__key__", "")


def load_eval_split(source: str, tokenizer_path: str, *, image_size: int, text_len: int,
                    pp: str = "", fields: Sequence[str] = ()) -> dict[str, Any]:
    """A whole held-out split in order: image [N,...] (after `pp`), label [N] (-1: none), text [M,L] (every
    reference caption of every image, in image order), text_image [M] (the index of each caption's image),
    captions (N lists of the raw reference strings, in text's order: flattened they match text's rows; empty
    for an image without captions), key (N names, see sample_name) and fields ({name: N values, None where a
    sample lacks it} for each of `fields`, read from the shards' `.json`).

    `source` is a shard spec, "tfds:NAME/SPLIT[@DATA_DIR]", "csv:FILE" or "folder:DIR"; `pp` is the image
    op spec (default: default_pp_eval(image_size)). Unusable samples are skipped, logged and counted.
    """
    spec = pp or default_pp_eval(image_size)
    image_op = build_image_op(spec)
    tokenizer = Tokenizer(tokenizer_path)
    folder = source.startswith("folder:")

    def to_example(sample: dict, rng: np.random.Generator) -> dict:
        captions = [text for text in sample.get("captions") or [sample.get("caption", "")] if text]
        tokens = tokenizer.encode(captions, text_len) if captions else np.zeros((0, text_len), np.int32)
        return {"image": image_op(sample, rng)["image"], "label": int(sample.get("label", -1)), "text": tokens,
                "captions": captions, "key": sample_name(sample, folder),
                "fields": {name: sample.get(name) for name in fields}}

    records = raw_eval_samples(source, fields)
    examples = list(PreprocessIterDataset(grain.MapDataset.source(records).to_iter_dataset(), to_example, seed=0))
    if not examples:
        raise DataError(f"no usable samples in the evaluation set {source!r}")
    skip_records = [record["__skipped__"] for record in records if "__skipped__" in record]
    skipped = sum(sum(counts.values()) for counts in skip_records) + len(records) - len(skip_records) - len(examples)
    if skipped:
        logging.warning("evaluation set %s: %d of %d samples skipped (reasons above); evaluating on the other %d",
                        source, skipped, skipped + len(examples), len(examples))
    shapes = sorted({example["image"].shape for example in examples})
    if len(shapes) > 1:
        raise ValueError(f"eval preprocessing {spec!r} gives images of different shapes ({shapes[0]}, "
                         f"{shapes[-1]}); end it with a fixed-size crop")
    texts = [example["text"] for example in examples]
    return {"image": np.stack([example["image"] for example in examples]),
            "label": np.array([example["label"] for example in examples], np.int64),
            "text": np.concatenate(texts).astype(np.int32),
            "text_image": np.repeat(np.arange(len(texts)), [len(t) for t in texts]).astype(np.int64),
            "captions": [list(example["captions"]) for example in examples],
            "key": [example["key"] for example in examples],
            "fields": {name: [example["fields"][name] for example in examples] for name in fields}}


def tokenize_class_prompts(tokenizer_path: str, class_names: Sequence[str], templates: Sequence[str],
                           text_len: int) -> np.ndarray:
    """int32 [classes, templates, text_len]: every template filled with every class name."""
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = Tokenizer(tokenizer_path).encode(prompts, text_len)
    return tokens.reshape(len(class_names), len(templates), text_len)
