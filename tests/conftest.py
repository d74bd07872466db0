"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist workers each load libtpu (TPU compiler)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """8 train shards x 25 samples, 2 eval shards (16-px JPEGs) and a sentencepiece model trained on them."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "data_pipelines.make_shards", "synthetic", "--out", str(out),
                    "--train-samples", "200", "--eval-samples", "48", "--image-size", "16",
                    "--samples-per-shard", "25"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_pipelines.tokenizer", "train", "--shards",
                    f"{out}/train/*.tar", "--vocab-size", "120", "--out", str(out / "spm.model")],
                   cwd=ROOT, check=True, capture_output=True)
    return out
