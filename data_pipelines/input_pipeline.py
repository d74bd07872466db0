"""grain pipelines: training batches streamed from tar shards, and held-out splits loaded into memory."""

from __future__ import annotations

import json
from typing import Sequence

import grain
from absl import flags
import numpy as np

from data_pipelines import ops
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.webdataset import expand_shards, read_tar_samples


class ReadShard(grain.experimental.FlatMapTransform):
    """Shard path -> its complete samples (raw bytes)."""

    max_fan_out = 1 << 20

    def flat_map(self, path: str) -> list[dict]:
        return read_tar_samples(path)


class Preprocess(grain.transforms.Map):
    """Raw sample -> {"image": float32 [S, S, 3] in [-1, 1], "text": int32 [L]}."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, text_len: int):
        self.tokenizer, self.image_size, self.text_len = tokenizer, image_size, text_len

    def map(self, sample: dict) -> dict[str, np.ndarray]:
        image = ops.decode_image(ops.image_bytes(sample), self.image_size)
        return {"image": ops.to_float(ops.resize(image, self.image_size)),
                "text": self.tokenizer.encode([ops.caption_text(sample)], self.text_len)[0]}


def local_shards(spec: str | Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's shards: every `process_count`-th, starting at `process_index` (no overlap)."""
    shards = expand_shards(spec)
    if len(shards) < process_count:
        raise ValueError(f"{len(shards)} shards cannot be split across {process_count} processes")
    return shards[process_index::process_count]


def make_train_dataset(shards: str | Sequence[str], tokenizer_path: str, *, global_batch_size: int,
                       image_size: int, text_len: int, seed: int, shuffle_buffer: int, num_workers: int,
                       process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None) -> grain.IterDataset:
    """Per-process batches {"image": [b, S, S, 3], "text": [b, L]} with b = global_batch_size / processes.

    Shard order is reshuffled every epoch from `seed`; samples are window-shuffled; the iterator's
    get_state / set_state resume the exact sample sequence.
    """
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    tokenizer = Tokenizer(tokenizer_path)
    paths = local_shards(shards, process_index, process_count)
    if num_workers > len(paths):
        raise ValueError(f"{num_workers} data workers but only {len(paths)} shards on this process")
    dataset = grain.MapDataset.source(paths).shuffle(seed=seed).repeat(num_epochs).to_iter_dataset()
    dataset = grain.experimental.FlatMapIterDataset(dataset, ReadShard())
    if shuffle_buffer > 1:
        dataset = grain.experimental.WindowShuffleIterDataset(dataset, window_size=shuffle_buffer, seed=seed)
    dataset = dataset.map(Preprocess(tokenizer, image_size, text_len))
    dataset = dataset.batch(global_batch_size // process_count, drop_remainder=True)
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


def load_eval_split(shards: str | Sequence[str], tokenizer_path: str, *, image_size: int,
                    text_len: int) -> dict[str, np.ndarray]:
    """A whole held-out split in file order: image [N,S,S,3], text [N,L] (captions), label [N] (-1: none)."""
    preprocess = Preprocess(Tokenizer(tokenizer_path), image_size, text_len)
    images, texts, labels = [], [], []
    for path in expand_shards(shards):
        for sample in read_tar_samples(path):
            example = preprocess.map(sample)
            images.append(example["image"])
            texts.append(example["text"])
            labels.append(json.loads(sample["json"]).get("label", -1) if "json" in sample else -1)
    return {"image": np.stack(images), "text": np.stack(texts), "label": np.asarray(labels, np.int32)}


def tokenize_class_prompts(tokenizer_path: str, class_names: Sequence[str], templates: Sequence[str],
                           text_len: int) -> np.ndarray:
    """int32 [classes, templates, text_len]: every template filled with every class name."""
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = Tokenizer(tokenizer_path).encode(prompts, text_len)
    return tokens.reshape(len(class_names), len(templates), text_len)
