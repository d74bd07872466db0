"""`bench packing`: real (non-pad) tokens of decoder-only VLM rows, packed against one example per row, on the same
examples.

(a) demo: the synthetic shapes shards through the real input pipeline, with the demo's tasks (caption, "what
    colour?", "what shape?"; shards written before the colour and shape fields existed ask "what is it?" ->
    classname instead) and the demo model's image tokens (mu/8 at 32 px: 16).
(b) long tail: web alt-text caption lengths, log-normal with median 12 tokens and sigma 0.75 (p99 about 69 tokens,
    cut at the text length), behind BOS, a 2-token prompt and a separator, with 256 image tokens per example.

Per mode: tokens per row, real tokens per row and per step (`rows` rows a step), the pad share, examples per row;
then the share of pad tokens packing removes (pad per example) and the gain in real tokens per row position.
"""

from __future__ import annotations

import grain
import numpy as np

from data_pipelines.input_pipeline import TrainInput, make_train_dataset
from data_pipelines.packing import RowIterDataset, row_layout
from data_pipelines.preprocess import SKIPPED_KEY
from data_pipelines.vlm_examples import vlm_options
from data_pipelines.webdataset import FieldMap, expand_shards, read_shard

DEMO_TASKS = {"caption": {"prefix": "caption", "suffix": "{caption}"},
              "colour": {"prefix": "what colour?", "suffix": "{colour}"},
              "shape": {"prefix": "what shape?", "suffix": "{shape}"}}
OLD_DEMO_TASKS = {"caption": {"weight": 1, "prefix": "caption", "suffix": "{caption}"},
                  "class": {"weight": 2, "prefix": "what is it?", "suffix": "{classname}"}}
TAIL_MEDIAN, TAIL_SIGMA, TAIL_PROMPT = 12, 0.75, 2


def row_stats(rows: list[dict], rows_per_step: int) -> dict:
    tokens = np.stack([row["segment_ids"] for row in rows])
    real = int((tokens > 0).sum())
    examples = float(sum(row["loss_weights"].sum() for row in rows))
    return {"row_length": tokens.shape[1], "examples_per_row": round(examples / len(rows), 3),
            "real_tokens_per_row": round(real / len(rows), 1),
            "real_tokens_per_step": round(real / len(rows) * rows_per_step),
            "pad_share": round(1 - real / tokens.size, 4), "pad_per_example": (tokens.size - real) / examples}


def compare(unpacked: list[dict], packed: list[dict], rows_per_step: int) -> dict:
    """Both modes' stats and what packing gains: pad tokens removed per example, real tokens per row position."""
    stats = {name: row_stats(rows, rows_per_step) for name, rows in (("unpacked", unpacked), ("packed", packed))}
    removed = 1 - stats["packed"]["pad_per_example"] / stats["unpacked"]["pad_per_example"]
    gain = (1 - stats["packed"]["pad_share"]) / (1 - stats["unpacked"]["pad_share"])
    for mode in stats.values():
        mode["pad_per_example"] = round(mode["pad_per_example"], 2)
    return {**stats, "rows_per_step": rows_per_step, "pad_tokens_removed": round(removed, 4),
            "real_tokens_per_position_gain": round(gain, 3)}


def demo_tasks(shards: str) -> dict:
    """The demo's tasks if the shards' .json has colour and shape, else the classname stand-in."""
    first = read_shard(expand_shards(shards)[0], FieldMap(json_fields=("colour", "shape")))[0]
    return DEMO_TASKS if {"colour", "shape"} <= set(first) else OLD_DEMO_TASKS


def pipeline_rows(options: TrainInput, examples: int) -> list[dict]:
    """Rows of the training pipeline (one row per batch) until `examples` examples are in them."""
    iterator = iter(make_train_dataset(options))
    rows, seen = [], 0.0
    try:
        while seen < examples - 0.5:
            rows.append(next(iterator))
            seen += float(rows[-1]["loss_weights"].sum())
    finally:
        iterator.close()
    return [{key: value[0] for key, value in row.items()} for row in rows]


def bench_demo(data_dir: str, image_tokens: int, text_len: int, pack_images: int, rows: int, examples: int) -> dict:
    shards = f"{data_dir}/train/*.tar"
    tasks = demo_tasks(shards)
    result = {"data": data_dir, "image_tokens": image_tokens, "text_len": text_len, "tasks": sorted(tasks)}
    modes = []
    for pack in (False, True):
        vlm = vlm_options({"image_tokens": image_tokens, "text_len": text_len, "tasks": tasks, "pack": pack,
                           "pack_images": pack_images})
        options = TrainInput(sources={"train": shards}, weights={"train": 1.0}, pp="decode(32)|resize(32)",
                             tokenizer=f"{data_dir}/spm.model", global_batch_size=1, seed=0, shuffle_buffer=1000,
                             vlm=vlm, image_size=32)
        modes.append(pipeline_rows(options, examples))
    return {**result, **compare(*modes, rows)}


def long_tail_examples(count: int, text_len: int, image_tokens: int, seed: int = 0) -> list[dict]:
    """Examples of log-normal caption lengths: BOS, prompt, separator, caption ids, EOS (cut to text_len)."""
    rng = np.random.default_rng(seed)
    captions = np.maximum(1, np.round(rng.lognormal(np.log(TAIL_MEDIAN), TAIL_SIGMA, count))).astype(int)
    prefix_len = 1 + TAIL_PROMPT + 1
    return [{"text": np.ones(min(prefix_len + n + 1, text_len), np.int32), "prefix_len": prefix_len,
             "image": np.zeros((1, 1, 3), np.uint8), SKIPPED_KEY: np.zeros(1, np.int32)} for n in captions]


def bench_long_tail(image_tokens: int, text_len: int, pack_images: int, rows: int, examples: int) -> dict:
    made = long_tail_examples(examples, text_len, image_tokens)
    modes = []
    for pack in (False, True):
        vlm = vlm_options({"image_tokens": image_tokens, "text_len": text_len, "pack": pack,
                           "pack_images": pack_images, "tasks": {"caption": {"prefix": "", "suffix": "-"}}})
        layout = row_layout(vlm, image_size=1)  # 1 x 1 px images: the token counts are what is measured
        modes.append(list(RowIterDataset(grain.MapDataset.source(made).to_iter_dataset(), layout)))
    lengths = np.array([len(example["text"]) for example in made])
    return {"image_tokens": image_tokens, "text_len": text_len, "examples": examples,
            "caption_tokens": {"median": TAIL_MEDIAN, "sigma": TAIL_SIGMA,
                               "text_mean": round(float(lengths.mean()), 1),
                               "text_p99": int(np.percentile(lengths, 99))},
            **compare(*modes, rows)}


def bench_packing(data_dir: str, image_tokens: int = 16, text_len: int = 32, pack_images: int = 4, rows: int = 32,
                  examples: int = 1024, tail_image_tokens: int = 256, tail_text_len: int = 128,
                  tail_examples: int = 8192) -> dict:
    return {"bench": "packing", "pack_images": pack_images,
            "demo": bench_demo(data_dir, image_tokens, text_len, pack_images, rows, examples),
            "long_tail": bench_long_tail(tail_image_tokens, tail_text_len, pack_images, rows, tail_examples)}
