"""Held-out splits loaded whole into host memory, and tokenized zero-shot class prompts."""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from data_pipelines import ops
from data_pipelines.preprocess import PreprocessIterDataset
from data_pipelines.samples import DataError
from data_pipelines.sources import raw_eval_samples
from data_pipelines.tokenizer import Tokenizer


def default_pp_eval(image_size: int) -> str:
    return f"decode_center_crop({image_size})"


def load_eval_split(source: str, tokenizer_path: str, *, image_size: int, text_len: int,
                    pp: str = "") -> dict[str, np.ndarray]:
    """A whole held-out split in order: image [N,S,S,3], text [N,L] (captions), label [N] (-1: none).

    `source` is a shard spec, "tfds:NAME/SPLIT[@DATA_DIR]", "csv:FILE" or "folder:DIR"; `pp` is the image
    op spec (default: centre crop, [-1, 1]). Unusable samples are skipped and logged.
    """
    image_op = ops.build(pp or default_pp_eval(image_size))
    tokenizer = Tokenizer(tokenizer_path)

    def to_example(sample: dict, rng: np.random.Generator) -> dict:
        caption = sample.get("caption", "")
        return {"image": image_op(sample, rng)["image"], "label": int(sample.get("label", -1)),
                "text": tokenizer.encode([caption], text_len)[0] if caption else np.zeros(text_len, np.int32)}

    records = grain.MapDataset.source(raw_eval_samples(source)).to_iter_dataset()
    examples = list(PreprocessIterDataset(records, to_example, seed=0))
    if not examples:
        raise DataError(f"no usable samples in the evaluation set {source!r}")
    return {key: np.stack([example[key] for example in examples]) for key in ("image", "text", "label")}


def tokenize_class_prompts(tokenizer_path: str, class_names: Sequence[str], templates: Sequence[str],
                           text_len: int) -> np.ndarray:
    """int32 [classes, templates, text_len]: every template filled with every class name."""
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = Tokenizer(tokenizer_path).encode(prompts, text_len)
    return tokens.reshape(len(class_names), len(templates), text_len)
