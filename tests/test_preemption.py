"""SIGTERM is a preemption notice: every process of a job saves at the same step (train state and data-iterator
state), waits for the save and exits 42; the same command run again resumes and ends on the exact loss of an
uninterrupted run. Repeated signals during the save do not cut it short, and a kill -9 in the middle of it
leaves the previous complete checkpoint usable. Real processes: vlm_jax.train alone and under launch.local
(2 processes, jax.distributed over 127.0.0.1, gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp
import pytest

from processes import alive, descendants
from synthetic_data import make_data
from test_train_cli import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.evals={}"]  # no evaluation: only the losses are compared
PREEMPTED = 42
NOTICE = "preemption notice (SIGTERM): saving a checkpoint at step "


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_data(tmp_path_factory.mktemp("data"), train_samples=512, eval_samples=48, samples_per_shard=128))


def single_command(data_dir, workdir) -> list[str]:
    return [sys.executable, "-m", "vlm_jax.train", f"--config=configs/demo/clip_tiny.py:{data_dir}",
            f"--workdir={workdir}", *TINY, *FAST, "--config.total_steps=40"]


def job_command(data_dir, workdir) -> list[str]:
    """Two processes x 1 CPU device under launch.local."""
    return [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "1", "--timeout-s",
            "300", "--", *single_command(data_dir, workdir)]


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every run: a shared persistent compilation cache (the same executables, so the same
    losses, in half the CPU time of compiling in each process)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("compilation_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def one_device(job_env) -> dict[str, str]:
    """The environment of single-process runs: one CPU device."""
    return {**job_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def single_reference(data_dir, tmp_path_factory, one_device):
    """The final loss of an uninterrupted single-process run."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=one_device)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(workdir)[40]


def losses(workdir) -> dict[int, float]:
    """{step: loss} of metrics.jsonl; asserts that no step is logged twice."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == sorted(set(steps)), steps
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def saved_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def train_process_id(pid: int) -> int | None:
    """VLM_JAX_PROCESS_ID of a vlm_jax.train process started by launch.local (None for any other process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"vlm_jax.train" not in f.read():
                return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"VLM_JAX_PROCESS_ID"]) if b"VLM_JAX_PROCESS_ID" in env else None


def run_until(command: list[str], act: dict[str, Callable[[subprocess.Popen], None]],
              env: dict[str, str] | None = None, timeout_s: float = 240) -> tuple[int, str]:
    """Runs `command` in its own process group, calling act[prefix](process) on the first output line containing
    each prefix; returns (exit status, output). Whatever is still running at the timeout is killed."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    output, pending, deadline = [], dict(act), time.monotonic() + timeout_s
    try:
        for line in process.stdout:
            output.append(line)
            for prefix in [prefix for prefix in pending if prefix in line]:
                pending.pop(prefix)(process)
            assert time.monotonic() < deadline, "".join(output)[-3000:]
        return process.wait(timeout=60), "".join(output)
    finally:
        process.kill()
        process.wait()


def preempted_step(output: str, prefix: str = "") -> int:
    """N of the one line `<prefix>preempted at step N: checkpoint saved; exiting 42`."""
    [line] = [line for line in output.splitlines() if line.startswith(f"{prefix}preempted at step ")]
    assert line.endswith(": checkpoint saved; exiting 42"), line
    return int(line.split("preempted at step ")[1].split(":")[0])


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_job_saves_both_at_one_step_and_resumes_exactly(data_dir, tmp_path, job_env):
    """SIGTERM to process 1 only: JAX's preemption sync point gives both processes the same step (its service
    polls for SIGTERM once a second, so a few steps after the signal); both save (checkpoint and both
    data-iterator states) and exit 42; the same command again ends on the uninterrupted job's exact loss."""
    def sigterm_process_1(launcher: subprocess.Popen) -> None:
        [pid] = [pid for pid in descendants(launcher.pid) if train_process_id(pid) == 1]
        os.kill(pid, signal.SIGTERM)

    workdir = tmp_path / "run"
    status, output = run_until(job_command(data_dir, workdir), {"[0] step 5/40": sigterm_process_1}, job_env)
    assert status == PREEMPTED, output[-3000:]
    step = preempted_step(output, "[0] ")
    assert preempted_step(output, "[1] ") == step and 5 < step < 40, output[-3000:]
    assert saved_steps(workdir)[-1] == step
    assert sorted(os.listdir(workdir / f"checkpoints/{step}/data"))[-2:] == ["process_0-of-2.json",
                                                                           "process_1-of-2.json"]
    resumed = subprocess.run(job_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=job_env)
    assert resumed.returncode == 0 and f"[0] resumed from {workdir}/checkpoints at step {step}" in resumed.stdout, \
        resumed.stdout[-3000:]
    reference = subprocess.run(job_command(data_dir, tmp_path / "reference"), cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env=job_env)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert losses(workdir)[40] == losses(tmp_path / "reference")[40]


@pytest.mark.slow
def test_sigterm_to_a_single_process_saves_at_the_next_step_and_resumes_exactly(data_dir, tmp_path, one_device,
                                                                                 single_reference):
    """Without jax.distributed a Python handler takes SIGTERM: the next step is saved and the process exits 42.
    A second SIGTERM and a SIGINT while it saves change nothing; the saved step restores and the resumed run
    ends on the uninterrupted run's exact loss."""
    def signal_again(process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)

    workdir = tmp_path / "run"
    status, output = run_until(single_command(data_dir, workdir), {
        "step 10/40": lambda process: process.send_signal(signal.SIGTERM),
        NOTICE: signal_again}, one_device)
    assert status == PREEMPTED and "Traceback" not in output, output[-3000:]
    step = preempted_step(output)
    assert 10 < step < 40 and saved_steps(workdir)[-1] == step
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    resumed = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=one_device)
    assert resumed.returncode == 0 and f"resumed from {workdir}/checkpoints at step {step}" in resumed.stdout, \
        resumed.stderr[-3000:]
    assert losses(workdir)[40] == single_reference


@pytest.mark.slow
def test_sigterm_to_the_process_group_spares_the_data_workers(data_dir, tmp_path, one_device):
    """A host shutting down signals every process, grain's data workers too: they ignore SIGTERM (still alive
    when the save starts), so the trainer can read up to the step it agreed to save at; it saves, exits 42, and
    resumes on the uninterrupted run's exact loss (same worker count: the sample order depends on it)."""
    workers = ["--config.data.num_workers=2"]
    signalled: list[int] = []

    def sigterm_group(process: subprocess.Popen) -> None:
        signalled.extend(descendants(process.pid))
        os.killpg(process.pid, signal.SIGTERM)

    def workers_alive(process: subprocess.Popen) -> None:
        assert len(signalled) >= 2 and all(alive(pid) for pid in signalled), signalled

    workdir = tmp_path / "run"
    status, output = run_until(single_command(data_dir, workdir) + workers,
                               {"step 10/40": sigterm_group, NOTICE: workers_alive}, one_device)
    assert status == PREEMPTED and "Traceback" not in output, output[-3000:]
    step = preempted_step(output)
    assert 10 < step < 40 and saved_steps(workdir)[-1] == step
    for run in (workdir, tmp_path / "reference"):
        finished = subprocess.run(single_command(data_dir, run) + workers, cwd=ROOT, capture_output=True,
                                  text=True, timeout=300, env=one_device)
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert losses(workdir)[40] == losses(tmp_path / "reference")[40]


@pytest.mark.slow
def test_kill_during_the_preemption_save_leaves_the_previous_checkpoint_usable(data_dir, tmp_path, one_device):
    """SIGKILL as soon as the preemption save starts (the periodic save of step 10 or the preemption save is
    then still in its temporary directory): orbax commits a checkpoint by renaming that directory, so every
    checkpoint directory left (an older one at least) restores, the temporary one is removed on resume, and the
    run resumes from the newest complete checkpoint to the end. (The exact loss of a resumed run is the test
    above's.)"""
    workdir = tmp_path / "run"
    status, output = run_until(single_command(data_dir, workdir), {
        "step 10/40": lambda process: process.send_signal(signal.SIGTERM),
        NOTICE: lambda process: process.kill()}, one_device)
    assert status == -signal.SIGKILL, output[-3000:]
    cut = int(output.split(NOTICE)[1].split()[0])
    saved = saved_steps(workdir)
    assert saved and saved[-1] <= cut and saved[0] < cut, (saved, cut)
    assert list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # a save was cut (measured: every time)
    for step in saved:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
        assert int(np.asarray(state["step"])) == step
    resumed = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=one_device)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints at step {saved[-1]}" in resumed.stdout
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert saved_steps(workdir)[-1] == 40 and np.isfinite(losses(workdir)[40])
