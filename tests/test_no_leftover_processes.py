"""The session-end check of tests/conftest.py: a test session that leaves a process behind fails and ends it,
also when the process was orphaned (its parent, started by a test, exited first)."""

import os
import shutil
import subprocess
import sys
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

LEAKY_TESTS = """
import subprocess

def test_leaves_a_child():
    subprocess.Popen(["sleep", "120"])

def test_leaves_an_orphan(tmp_path):
    subprocess.run(["sh", "-c", f"sleep 121 & echo $! > {tmp_path}/orphan"], check=True)
"""

TIDY_TESTS = """
import subprocess

def test_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)
"""


def run_session(tmp_path, tests: str) -> subprocess.CompletedProcess:
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(tests)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def sleeping(seconds: str) -> list[int]:
    """Pids of live `sleep <seconds>` processes."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_session_that_leaves_processes_fails_and_ends_them(tmp_path):
    result = run_session(tmp_path, LEAKY_TESTS)
    assert result.returncode != 0, result.stdout
    assert "2 processes started by the tests were still alive 10 s after the last test (killed now)" in result.stdout
    assert "sleep 120" in result.stdout and "sleep 121" in result.stdout
    time.sleep(0.5)  # the killed orphan is reaped by init
    assert sleeping("120") == [] and sleeping("121") == []


def test_a_tidy_session_passes(tmp_path):
    result = run_session(tmp_path, TIDY_TESTS)
    assert result.returncode == 0, result.stdout
