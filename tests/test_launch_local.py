"""launch/local.py with real processes: a failure, the launcher's timeout and a signal to the launcher each end
the whole job promptly, and no process of it (nor a child it started) stays alive."""

import os
import signal
import subprocess
import sys
import time

import pytest

from processes import alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One job process: starts a grandchild (as grain starts data workers), writes "own pid, grandchild pid" to
# OUT/<process id>, then either (process FAIL) waits for every process's pid file and exits 3, or sleeps 300 s.
JOB_PROCESS = """
import os, subprocess, sys, time
out, processes, fail = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
index = int(os.environ["VLM_JAX_PROCESS_ID"])
grandchild = subprocess.Popen(["sleep", "300"])
with open(f"{out}/{index}.tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.rename(f"{out}/{index}.tmp", f"{out}/{index}")
if index == fail:
    while len([name for name in os.listdir(out) if not name.endswith(".tmp")]) < processes:
        time.sleep(0.05)
    sys.exit(3)
time.sleep(300)
"""


def start_job(tmp_path, *launcher_flags: str, processes: int = 2, fail: int = -1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--processes", str(processes), *launcher_flags,
         "--", sys.executable, "-c", JOB_PROCESS, str(tmp_path), str(processes), str(fail)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_pids(tmp_path, processes: int, timeout_s: float = 60) -> list[int]:
    """Every job process's and grandchild's pid, once all of them have written theirs."""
    deadline = time.monotonic() + timeout_s
    while len([p for p in tmp_path.iterdir() if p.suffix != ".tmp"]) < processes:
        assert time.monotonic() < deadline, "the job's processes did not start"
        time.sleep(0.05)
    return [int(pid) for i in range(processes) for pid in (tmp_path / str(i)).read_text().split()]


def finish(launcher: subprocess.Popen, tmp_path, processes: int, timeout_s: float) -> tuple[int, float, list[int]]:
    """(exit status, seconds from the job's processes being up to the launcher's return, pids still alive); kills
    whatever is left so a failing test leaves nothing behind."""
    pids = job_pids(tmp_path, processes)
    started = time.monotonic()
    try:
        launcher.communicate(timeout=timeout_s)
        return launcher.returncode, time.monotonic() - started, [pid for pid in pids if alive(pid)]
    finally:
        launcher.kill()
        launcher.communicate()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_failed_process_stops_the_others(tmp_path):
    launcher = start_job(tmp_path, fail=1)  # process 0 blocks (sleeps) while process 1 fails at once
    status, seconds, left = finish(launcher, tmp_path, processes=2, timeout_s=60)
    assert status == 3 and seconds < 10 and left == [], (status, seconds, left)


def test_the_launchers_timeout_stops_every_process(tmp_path):
    launcher = start_job(tmp_path, "--timeout-s", "3")
    status, seconds, left = finish(launcher, tmp_path, processes=2, timeout_s=60)
    assert status == 124 and seconds < 10 and left == [], (status, seconds, left)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_process(tmp_path, sig):
    launcher = start_job(tmp_path)
    job_pids(tmp_path, 2)
    launcher.send_signal(sig)
    status, seconds, left = finish(launcher, tmp_path, processes=2, timeout_s=60)
    assert status == 128 + sig and seconds < 10 and left == [], (status, seconds, left)


def test_a_command_that_cannot_start_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.local", "--processes", "2", "--", str(tmp_path / "nothing")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 127 and result.stderr.strip().splitlines() == [
        f"error: cannot start '{tmp_path / 'nothing'}': No such file or directory"], result.stderr[-2000:]
