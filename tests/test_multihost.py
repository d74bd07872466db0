"""Real multi-process jobs over jax.distributed on 127.0.0.1 (gloo): 2 processes x 4 CPU devices train like
1 device and like 8 simulated devices; an unreachable coordinator is a one-line error."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_train_step import run_steps, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=8),
                                  dict(data=2, fsdp=2, dcn_data=2)])  # one process per "slice"
def test_two_processes_match_one_and_eight_devices(mesh):
    single = run_steps(tiny_config(), jax.devices()[:1], steps=5)
    eight = run_steps(tiny_config(**mesh), jax.devices(), steps=5)
    job = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4",
         "--timeout-s", "400", "--", sys.executable, "tests/multiprocess_steps.py",
         *(f"{axis}={size}" for axis, size in mesh.items())],
        cwd=ROOT, capture_output=True, text=True, timeout=450)
    assert job.returncode == 0, job.stdout[-3000:]
    [line] = [line for line in job.stdout.splitlines() if "LOSSES " in line]
    result = json.loads(line.split("LOSSES ", 1)[1])
    assert result["processes"] == 2 and result["devices"] == 8
    np.testing.assert_allclose(eight, single, rtol=1e-5)
    np.testing.assert_allclose(result["losses"], single, rtol=1e-5)


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
    env = {**os.environ, "VLM_JAX_DISTRIBUTED_TIMEOUT_S": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.train", "--config=configs/demo/clip_tiny.py", f"--workdir={tmp_path}",
         "--coordinator=127.0.0.1:9", "--num-processes=2", "--process-id=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "cannot reach the coordinator 127.0.0.1:9 within 3 s" in errors[0]


@pytest.mark.slow
def test_train_cli_as_a_two_process_job_checkpoints_and_resumes(tmp_path):
    """vlm_jax.train under launch/local.py: process 0 logs, both write checkpoint and data-iterator shards."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.make_shards", "synthetic", "--out", str(data),
                    "--train-samples", "256", "--eval-samples", "48", "--image-size", "16",
                    "--samples-per-shard", "64"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_pipelines.tokenizer", "train", "--shards", f"{data}/train/*.tar",
                    "--vocab-size", "200", "--out", str(data / "spm.model")], cwd=ROOT, check=True,
                   capture_output=True)
    from test_train_cli import TINY

    def train(steps):
        return subprocess.run(
            [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4",
             "--timeout-s", "400", "--", sys.executable, "-m", "vlm_jax.train",
             f"--config=configs/demo/clip_tiny.py:{data}", f"--workdir={tmp_path / 'run'}", *TINY,
             "--config.mesh.fsdp=2", f"--config.total_steps={steps}"],
            cwd=ROOT, capture_output=True, text=True, timeout=450)
    first = train(10)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "[0] step 10/10" in first.stdout and "[1] step" not in first.stdout  # only process 0 logs
    assert sorted(os.listdir(tmp_path / "run/checkpoints/10/data"))[-2:] == ["process_0-of-2.json",
                                                                            "process_1-of-2.json"]
    second = train(15)
    assert second.returncode == 0 and "[0] resumed from" in second.stdout, second.stdout[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == [5, 10, 15]
