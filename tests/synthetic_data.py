"""Synthetic webdataset shards (16-px JPEGs, captions, 24 classes) and a sentencepiece model trained on them,
made through the command-line tools as a user would."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(out: Path, *, train_samples: int, eval_samples: int, samples_per_shard: int,
              vocab_size: int = 200) -> Path:
    """`out/train/*.tar`, `out/eval/*.tar`, class names and templates, and `out/spm.model`."""
    for command in (
            ["data_pipelines.make_shards", "synthetic", "--out", str(out), "--train-samples", str(train_samples),
             "--eval-samples", str(eval_samples), "--image-size", "16", "--samples-per-shard",
             str(samples_per_shard)],
            ["data_pipelines.tokenizer", "train", "--shards", f"{out}/train/*.tar", "--vocab-size",
             str(vocab_size), "--out", str(out / "spm.model")]):
        made = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-3000:]
    return out
