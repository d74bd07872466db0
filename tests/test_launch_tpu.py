"""launch/tpu.py: golden --dry-run output (single-host v5e-8, v5p-256 shipped through a gs:// stage, two-slice
v6e-256), one-line errors, and pods whose workers are local processes behind tests/fake_gcloud.py (first on
PATH): up -> run (the real trainer, 2 workers joined by jax.distributed's own cluster detection) -> logs ->
down; a crashed worker stops the others (fail-fast); a worker that never starts is named, not waited for.

The goldens live in tests/golden/launch_tpu/. After an intended change of the commands, rewrite them with
    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch_tpu.py -k golden
and review the diff like code.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_cli import TINY

ROOT = Path(__file__).resolve().parent.parent
STARTED = "launch.tpu_worker: started"  # a worker's first line (launch/tpu_worker.py)
GOLDEN = ROOT / "tests/golden/launch_tpu"
TRAIN = ["python", "-m", "vlm_jax.train", "--config=configs/demo/clip_tiny.py:gs://my-bucket/data",
         "--workdir=gs://my-bucket/runs/clip_tiny"]

GOLDEN_PODS = {
    "v5e-8": (["--accelerator-type=v5e-8", "--zone=us-west4-a", "--project=my-project"], ["--spot"]),
    "v5p-256": (["--accelerator-type=v5p-256", "--zone=us-east5-a", "--project=my-project",
                 "--stage=gs://my-bucket/staging"], ["--reserved"]),
    "v6e-256x2": (["--accelerator-type=v6e-256", "--node-count=2", "--zone=us-east5-b", "--project=my-project"],
                  ["--best-effort"]),
}


def launch_tpu(*argv: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.tpu", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def dry_run(cwd: Path, pod: list[str], up: list[str]) -> str:
    """The --dry-run output of up, run, logs, stop and down, each after the command line that printed it."""
    out = []
    for action, extra in [("up", up), ("run", ["--env", "WANDB_MODE=offline", "--", *TRAIN]), ("logs", []),
                          ("stop", []), ("down", [])]:
        argv = [action, "demo", *pod, "--dry-run", *extra]
        result = launch_tpu(*argv, cwd=cwd)
        assert result.returncode == 0, result.stderr
        out.append(f"$ python -m launch.tpu {shlex.join(argv)}\n{result.stdout}")
    return "".join(out)


@pytest.mark.parametrize("case", GOLDEN_PODS)
def test_dry_run_golden(case, tmp_path):
    output = dry_run(tmp_path, *GOLDEN_PODS[case])  # in an empty folder: no saved pod settings
    path = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(output)
    assert output == path.read_text(), f"{path} differs; UPDATE_GOLDEN=1 rewrites it (then review the diff)"
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_golden_facts():
    """What the goldens must say, independent of their exact text."""
    v5e, v5p, v6e = ((GOLDEN / f"{case}.txt").read_text() for case in GOLDEN_PODS)
    assert "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --node-id=demo --spot" in v5e
    assert "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --node-id=demo --reserved" in v5p
    assert ("gcloud alpha compute tpus queued-resources create demo --zone=us-east5-b --project=my-project "
            "--accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e --node-count=2 --node-prefix=demo "
            "--best-effort") in v6e
    assert "gcloud storage cp logs/demo/checkout.tar.gz gs://my-bucket/staging/demo/checkout.tar.gz" in v5p
    for text, workers in [(v5e, 1), (v5p, 32), (v6e, 128)]:
        starts = [line for line in text.splitlines() if "launch.tpu_worker start" in line]
        assert len(starts) == workers and all("VLM_JAX_AUTO_DISTRIBUTED=1" in line for line in starts)
    assert "ssh demo-1 --zone=us-east5-b --project=my-project --worker=63 " in v6e


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), result.stderr
    return err[0]


def test_unknown_accelerator_type_is_one_line():
    line = one_line_error(launch_tpu("up", "demo", "--accelerator-type=v5p-100", "--dry-run"))
    assert "unknown accelerator type 'v5p-100'; known: v4-8," in line and "v5p-256" in line and "v6e-256" in line


def test_missing_gcloud_is_one_line(tmp_path):
    result = launch_tpu("up", "demo", "--accelerator-type=v5e-8", f"--logs-dir={tmp_path}",
                        env={"PATH": str(tmp_path)})
    assert one_line_error(result).startswith("error: gcloud is not on PATH")


class FakePod:
    """A pod behind tests/fake_gcloud.py: its state in `root`, the launcher's logs in `logs`."""

    def __init__(self, tmp_path: Path, name: str = "pod"):
        self.root, self.logs, self.name = tmp_path / "fake", tmp_path / "logs", name
        bin_dir = tmp_path / "bin"
        for folder in (self.root, bin_dir):
            folder.mkdir()
        (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT}/tests/fake_gcloud.py "$@"\n')
        (bin_dir / "gcloud").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_ROOT": str(self.root)}

    def launch(self, action: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.tpu", action, self.name, f"--logs-dir={self.logs}",
                               *args], cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)

    def home(self, node: str, worker: int) -> Path:
        return self.root / "workers" / node / str(worker)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.root / "calls.jsonl").read_text().splitlines()]

    def pip_installs(self) -> list[dict]:
        path = self.root / "pip.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def processes(self) -> list[int]:
        """Live processes running in one of the pod's worker homes (HOME=root/workers/...)."""
        mark = f"HOME={self.root}/workers/".encode()
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(item.startswith(mark) for item in environ.split(b"\0")):
                found.append(int(entry))
        return found


def train_command(data: Path, workdir: Path, steps: int) -> list[str]:
    return ["python", "-m", "vlm_jax.train", f"--config=configs/demo/clip_tiny.py:{data}", f"--workdir={workdir}",
            *TINY, "--config.mesh.fsdp=2", f"--config.total_steps={steps}"]


@pytest.mark.slow
def test_up_run_logs_down_with_the_real_trainer(tmp_path, synthetic_shards):
    pod = FakePod(tmp_path)
    up = pod.launch("up", "--accelerator-type=v5p-16", "--zone=us-east5-a", "--poll-s=0.05")
    assert up.returncode == 0, up.stderr
    assert "WAITING_FOR_RESOURCES" in up.stderr and "PROVISIONING" in up.stderr
    assert pod.calls()[0][:7] == ["compute", "tpus", "queued-resources", "create", "pod", "--zone=us-east5-a",
                                  "--accelerator-type=v5p-16"]

    run = pod.launch("run", "--grace-s=5", "--", *train_command(synthetic_shards, tmp_path / "run", steps=5))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "step 5/5" in run.stdout  # worker 0 is streamed
    logs = [(pod.logs / f"pod/worker-{k}.log").read_text() for k in range(2)]
    assert "step 5/5" in logs[0] and logs[1].startswith(STARTED) and "step" not in logs[1]  # only process 0 logs
    assert sorted(os.listdir(tmp_path / "run/checkpoints/5/data"))[-2:] == ["process_0-of-2.json",
                                                                         "process_1-of-2.json"]
    installs = pod.pip_installs()
    assert sorted((item["home"], item["args"]) for item in installs) == [
        (str(pod.home("pod", k)), ["install", "--quiet", "-e", ".[tpu]"]) for k in range(2)], installs

    for k in range(2):
        (pod.logs / f"pod/worker-{k}.log").unlink()
    fetched = pod.launch("logs", "--tail=3")
    assert fetched.returncode == 0, fetched.stderr
    assert "step 5/5" in (pod.logs / "pod/worker-0.log").read_text()
    assert (pod.logs / "pod/worker-1.log").exists() and len(fetched.stdout.splitlines()) == 3

    again = pod.launch("run", "--", "python", "-c", "print('again')")
    assert again.returncode == 0 and "again" in again.stdout, again.stderr
    assert len(pod.pip_installs()) == 2  # setup.py unchanged: the venv is reused

    down = pod.launch("down")
    assert down.returncode == 0, down.stderr
    assert pod.calls()[-1][:5] == ["compute", "tpus", "queued-resources", "delete", "pod"]
    assert json.loads((pod.root / "state.json").read_text()) == {}
    assert not (pod.logs / "pod/pod.json").exists()


@pytest.mark.slow
def test_a_crashed_worker_stops_the_others(tmp_path, synthetic_shards):
    pod = FakePod(tmp_path)
    assert pod.launch("up", "--accelerator-type=v5p-16", "--poll-s=0.05").returncode == 0
    started = time.monotonic()
    run = pod.launch("run", "--grace-s=5", "--", *train_command(synthetic_shards, tmp_path / "run", steps=500),
                     FAKE_GCLOUD_KILL="1:8")  # worker 1's host dies 8 s in; worker 0 would wait for it
    seconds = time.monotonic() - started
    assert run.returncode == 137, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: worker 1 (pod, worker 1) failed with exit status 137; stopped every worker; "
        f"log {pod.logs}/pod/worker-1.log"), run.stderr[-3000:]
    assert seconds < 45 and pod.processes() == [], (seconds, pod.processes())


@pytest.mark.slow
def test_a_worker_that_never_starts_is_named(tmp_path):
    pod = FakePod(tmp_path)
    assert pod.launch("up", "--accelerator-type=v5p-16", "--poll-s=0.05").returncode == 0
    run = pod.launch("run", "--start-timeout-s=10", "--grace-s=2", "--", "python", "-c",
                     "import jax; jax.distributed.initialize(); print('joined')",
                     FAKE_GCLOUD_UNREACHABLE="1")  # worker 0 waits for it in jax.distributed
    assert run.returncode == 124, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: worker 1 (pod, worker 1) did not start within 10 s; stopped every worker; "
        f"log {pod.logs}/pod/worker-1.log"), run.stderr[-3000:]
    assert "joined" not in run.stdout and pod.processes() == []


@pytest.mark.slow
def test_a_worker_that_starts_but_never_joins_is_named(tmp_path):
    """Worker 1 starts but hangs before jax.distributed; JAX's runtime aborts worker 0 at its timeout without
    naming anyone (SIGABRT, 134): the report names worker 1, the one that never registered."""
    pod = FakePod(tmp_path)
    assert pod.launch("up", "--accelerator-type=v5p-16", "--poll-s=0.05").returncode == 0
    run = pod.launch("run", "--grace-s=2", "--join-timeout-s=5", "--", "python", "-c",
                     "import os, time; os.environ['OMPI_COMM_WORLD_RANK'] == '1' and time.sleep(600); "
                     "from vlm_jax.parallel import distributed as d; d.initialize(d.options_from_env())")
    assert run.returncode == 134, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: worker 1 (pod, worker 1) never registered with the coordinator (it did not reach "
        f"jax.distributed); worker 0 (pod, worker 0) gave up waiting with exit status 134; stopped every "
        f"worker; log {pod.logs}/pod/worker-1.log"), run.stderr[-3000:]
    assert pod.processes() == []


def stale_run(home: Path) -> subprocess.Popen:
    """A process recorded as the worker's run (as a previous launcher would have left it)."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    start_time = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (home / "vlm_jax_pod").mkdir(exist_ok=True)
    (home / "vlm_jax_pod/run.pid").write_text(f"{process.pid} {start_time}")
    return process


@pytest.mark.slow
def test_two_slices_through_a_gs_stage_clear_stale_runs_and_stop(tmp_path):
    pod = FakePod(tmp_path)
    up = pod.launch("up", "--accelerator-type=v5p-8", "--node-count=2", "--stage=gs://bucket/staging",
                    "--poll-s=0.05")
    assert up.returncode == 0, up.stderr
    homes = [pod.home("pod-0", 0), pod.home("pod-1", 0)]  # one worker per slice
    stale = [stale_run(home) for home in homes]
    for home in homes:
        (home / "tmp/libtpu_lockfile").write_text("")
    run = pod.launch("run", "--grace-s=2", "--", "python", "-c",
                     "import jax; jax.distributed.initialize(); print('process', jax.process_index(), 'of', "
                     "jax.process_count(), 'devices', jax.device_count())")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [process.wait(timeout=5) for process in stale] == [-15, -15]  # SIGTERM before the start
    assert not any((home / "tmp/libtpu_lockfile").exists() for home in homes)
    for k in range(2):
        assert f"process {k} of 2 devices 8" in (pod.logs / f"pod/worker-{k}.log").read_text()
    assert (pod.root / "gs/bucket/staging/pod/checkout.tar.gz").exists()
    assert (homes[1] / "vlm_jax_pod/src/vlm_jax/train.py").exists()

    stale = [stale_run(home) for home in homes]
    stop = pod.launch("stop", "--grace-s=2")
    assert stop.returncode == 0, stop.stderr
    assert [process.wait(timeout=5) for process in stale] == [-15, -15]
