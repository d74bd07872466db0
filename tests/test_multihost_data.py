"""Two training processes whose data ends or fails at different steps stop together, with one line each, instead
of one exiting while the other waits in the next step's collectives."""

import json
import os
import subprocess
import sys

import pytest

from synthetic_data import make_data
from test_train_cli import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def three_shards(tmp_path):
    """3 train shards of 64 samples: process 0 reads shards 0 and 2 (128 samples), process 1 shard 1 (64)."""
    return make_data(tmp_path / "data", train_samples=192, eval_samples=48, samples_per_shard=64)


def train_two_processes(data, workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4", "--timeout-s",
         "300", "--", sys.executable, "-m", "vlm_jax.train", f"--config=configs/demo/clip_tiny.py:{data}",
         f"--workdir={workdir}", *TINY, "--config.total_steps=30", "--config.data.num_workers=0",
         "--config.data.shuffle_buffer=16", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=360)


@pytest.mark.slow
def test_processes_agree_to_end_when_one_runs_out_of_data(three_shards, tmp_path):
    """Process 1's 64 samples last 4 steps of 16 rows; process 0 has data for 8. Both end after step 4: the
    steps fed by process 0 alone changed nothing, and step 4 is saved and evaluated."""
    job = train_two_processes(three_shards, tmp_path / "run", "--config.data.num_epochs=1")
    assert job.returncode == 0, job.stdout[-4000:]
    assert "[0] another process's training data ran out at step 5" in job.stdout, job.stdout[-4000:]
    assert "training ends at step 4" in job.stdout
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 4
    assert "4" in os.listdir(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_processes_stop_together_when_one_fails_on_its_data(three_shards, tmp_path):
    (three_shards / "train" / "00001.tar").write_bytes(os.urandom(4096))  # process 1's only shard
    job = train_two_processes(three_shards, tmp_path / "run")
    assert job.returncode == 2, job.stdout[-4000:]
    errors = [line for line in job.stdout.splitlines() if "error:" in line]
    assert len(errors) == 2, job.stdout[-4000:]
    assert any(line.startswith("[1] error:") and "unusable" in line for line in errors)
    assert any(line.startswith("[0] error: another process failed on its training data") for line in errors)
