"""Real multi-process jobs over jax.distributed on 127.0.0.1 (gloo): 2 processes x 4 CPU devices train like
1 device and like 8 simulated devices (losses and gradient norms); a 2-process run resumed from its checkpoint
ends where an uninterrupted one does; an unreachable coordinator and an automatic start-up with no cluster to
detect are one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch.local import free_coordinator_port

from synthetic_data import make_data
from test_train_step import assert_same_history, run_steps, tiny_config

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
    [line] = [line for line in job.stdout.splitlines() if "HISTORY " in line]
    result = json.loads(line.split("HISTORY ", 1)[1])
    assert result["processes"] == 2 and result["devices"] == 8
    assert_same_history(eight, single)
    assert_same_history(result["history"], single)


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
    env = {**os.environ, "VLM_JAX_DISTRIBUTED_TIMEOUT_S": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.train", "--config=configs/demo/clip_tiny.py", f"--workdir={tmp_path}",
         "--coordinator=127.0.0.1:9", "--num-processes=2", "--process-id=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "cannot reach the coordinator 127.0.0.1:9 (its roll call on port 10) within 3 s" in errors[0]


@pytest.mark.slow
def test_a_process_that_never_registers_is_named(tmp_path):
    """Processes 0 and 1 of 3 start, 2 never does: process 0 names it in one line within the timeout (JAX's
    runtime alone would abort process 0 without naming anyone), and process 1 is released with one line."""
    coordinator = f"127.0.0.1:{free_coordinator_port()}"
    env = {**os.environ, "VLM_JAX_DISTRIBUTED_TIMEOUT_S": "5"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "vlm_jax.train", "--config=configs/demo/clip_tiny.py", f"--workdir={tmp_path}",
         f"--coordinator={coordinator}", "--num-processes=3", f"--process-id={k}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in range(2)]
    results = [process.communicate(timeout=120) for process in processes]
    errors = [[line for line in stderr.splitlines() if line.startswith("error:")] for _, stderr in results]
    assert [process.returncode for process in processes] == [2, 2] and all(len(e) == 1 for e in errors), results
    assert errors[0][0].startswith(f"error: process 2 of 3 never registered with the coordinator "
                                   f"127.0.0.1:{int(coordinator.split(':')[1]) + 1} within 5 s"), errors
    assert errors[1][0] == (f"error: process 0 ended the roll call at 127.0.0.1:{int(coordinator.split(':')[1]) + 1} "
                            f"before every process registered: see process 0's log"), errors


CLUSTER_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_COORDINATOR",
                        "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "VLM_JAX_")


@pytest.mark.slow
@pytest.mark.parametrize("cluster_env, cause", [
    ({}, "coordinator_address should be defined."),  # no cluster at all
    ({"OMPI_MCA_orte_hnp_uri": "4096.0;unparsable"},  # an Open MPI launch the runtime cannot read
     "Could not parse coordinator IP address from Open MPI environment.")])
def test_automatic_start_up_without_a_usable_cluster_is_a_one_line_error(tmp_path, cluster_env, cause):
    env = {key: value for key, value in os.environ.items() if not key.startswith(CLUSTER_ENV_PREFIXES)}
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.train", "--config=configs/demo/clip_tiny.py", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**env, **cluster_env, "VLM_JAX_AUTO_DISTRIBUTED": "1", "VLM_JAX_DISTRIBUTED_TIMEOUT_S": "3"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "VLM_JAX_AUTO_DISTRIBUTED=1 but jax.distributed.initialize() could not join a job" in errors[0]
    assert errors[0].endswith(cause), errors[0]


@pytest.mark.slow
def test_train_cli_as_a_two_process_job_checkpoints_and_resumes(tmp_path):
    """vlm_jax.train under launch/local.py: process 0 logs, both write checkpoint and data-iterator shards, and
    10 steps + a resume to 15 log the losses of 15 uninterrupted steps (a constant learning rate after warmup,
    so that extending total_steps leaves the schedule as it was)."""
    data = make_data(tmp_path / "data", train_samples=256, eval_samples=48, samples_per_shard=64)
    from test_train_cli import TINY

    def train(steps, workdir="run", *extra):
        return subprocess.run(
            [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "4",
             "--timeout-s", "400", "--", sys.executable, "-m", "vlm_jax.train",
             f"--config=configs/demo/clip_tiny.py:{data}", f"--workdir={tmp_path / workdir}", *TINY,
             "--config.mesh.fsdp=2", "--config.optim.decay=constant", f"--config.total_steps={steps}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=450)
    first = train(10)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "[0] step 10/10" in first.stdout and "[1] step" not in first.stdout  # only process 0 logs
    assert sorted(os.listdir(tmp_path / "run/checkpoints/10/data"))[-2:] == ["process_0-of-2.json",
                                                                            "process_1-of-2.json"]
    second = train(15, "run", "--allow-change=total_steps")
    assert second.returncode == 0 and "[0] resumed from" in second.stdout, second.stdout[-3000:]
    resumed = logged_losses(tmp_path / "run")
    assert list(resumed) == [5, 10, 15]
    uninterrupted = train(15, workdir="uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    expected = logged_losses(tmp_path / "uninterrupted")
    np.testing.assert_allclose([resumed[10], resumed[15]], [expected[10], expected[15]], rtol=1e-6)


def logged_losses(workdir) -> dict[int, float]:
    """{step: loss} of the training lines of a workdir's metrics.jsonl."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}
