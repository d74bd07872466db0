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

from processes import descendants
from synthetic_data import make_data
from test_train_cli import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.total_steps=40", "--config.evals={}"]  # no evaluation: only the losses are compared
PREEMPTED = 42
NOTICE = "preemption notice (SIGTERM): saving a checkpoint at step "


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_data(tmp_path_factory.mktemp("data"), train_samples=512, eval_samples=48, samples_per_shard=128))


def single_command(data_dir, workdir) -> list[str]:
    return [sys.executable, "-m", "vlm_jax.train", f"--config=configs/demo/clip_tiny.py:{data_dir}",
            f"--workdir={workdir}", *TINY, *FAST]


def job_command(data_dir, workdir) -> list[str]:
    """Two processes x 1 CPU device under launch.local."""
    return [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "1", "--timeout-s",
            "300", "--", *single_command(data_dir, workdir)]


@pytest.fixture(scope="module")
def single_reference(data_dir, tmp_path_factory):
    """The final loss of an uninterrupted single-process run."""
    workdir = tmp_path_factory.mktemp("reference")
    result = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
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


def run_until(command: list[str], act: dict[str, Callable[[subprocess.Popen], None]], timeout_s: float = 240) -> tuple[int, str]:
    """Runs `command`, calling act[prefix](process) on the first output line containing each prefix; returns
    (exit status, output). Whatever is still running at the timeout is killed."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
def test_sigterm_to_one_process_of_a_job_saves_both_at_one_step_and_resumes_exactly(data_dir, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync point gives both processes the same step; both save
    (checkpoint and both data-iterator states) and exit 42; the same command again ends on the uninterrupted
    job's exact loss."""
    def sigterm_process_1(launcher: subprocess.Popen) -> None:
        [pid] = [pid for pid in descendants(launcher.pid) if train_process_id(pid) == 1]
        os.kill(pid, signal.SIGTERM)

    workdir = tmp_path / "run"
    status, output = run_until(job_command(data_dir, workdir), {"[0] step 10/40": sigterm_process_1})
    assert status == PREEMPTED, output[-3000:]
    step = preempted_step(output, "[0] ")
    assert preempted_step(output, "[1] ") == step and 10 < step < 40, output[-3000:]
    assert saved_steps(workdir)[-1] == step
    assert sorted(os.listdir(workdir / f"checkpoints/{step}/data"))[-2:] == ["process_0-of-2.json",
                                                                           "process_1-of-2.json"]
    resumed = subprocess.run(job_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"[0] resumed from {workdir}/checkpoints at step {step}" in resumed.stdout, \
        resumed.stdout[-3000:]
    reference = subprocess.run(job_command(data_dir, tmp_path / "reference"), cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert losses(workdir)[40] == losses(tmp_path / "reference")[40]


@pytest.mark.slow
def test_sigterm_to_a_single_process_saves_at_the_next_step_and_resumes_exactly(data_dir, tmp_path,
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
        NOTICE: signal_again})
    assert status == PREEMPTED and "Traceback" not in output, output[-3000:]
    step = preempted_step(output)
    assert 10 < step < 40 and saved_steps(workdir)[-1] == step
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    resumed = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"resumed from {workdir}/checkpoints at step {step}" in resumed.stdout, \
        resumed.stderr[-3000:]
    assert losses(workdir)[40] == single_reference


@pytest.mark.slow
def test_kill_during_the_preemption_save_leaves_the_previous_checkpoint_usable(data_dir, tmp_path,
                                                                                single_reference):
    """SIGKILL as soon as the preemption save starts: orbax commits a checkpoint by renaming its temporary
    directory, so every checkpoint directory left restores, the cut one (if cut) is removed on resume, and the
    run resumes from the newest complete checkpoint to the uninterrupted run's exact loss."""
    workdir = tmp_path / "run"
    status, output = run_until(single_command(data_dir, workdir), {
        "step 10/40": lambda process: process.send_signal(signal.SIGTERM),
        NOTICE: lambda process: process.kill()})
    assert status == -signal.SIGKILL, output[-3000:]
    cut = int(output.split(NOTICE)[1].split()[0])
    saved = saved_steps(workdir)
    assert saved and saved[-1] <= cut and saved[0] < cut, (saved, cut)
    for step in saved:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
        assert int(np.asarray(state["step"])) == step
    resumed = subprocess.run(single_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"at step {saved[-1]}" in resumed.stdout, resumed.stderr[-3000:]
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert losses(workdir)[40] == single_reference
