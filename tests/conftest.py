"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere), the shared synthetic shards, and
a check that the session leaves no process behind."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist workers each load libtpu (TPU compiler)

import multiprocessing.resource_tracker  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """8 train shards x 25 samples, 2 eval shards (16-px JPEGs) and a sentencepiece model trained on them."""
    from synthetic_data import make_data
    return make_data(tmp_path_factory.mktemp("shards"), train_samples=200, eval_samples=48, samples_per_shard=25,
                     vocab_size=120)


SESSION_MARK = "VLM_JAX_TEST_SESSION"  # inherited by every process the session starts, and by theirs
LEFTOVER_GRACE_S = 10.0


def _live_processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, initial environment) of every live, non-zombie process this user can read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone meanwhile, or another user's
            continue
        if state != "Z":
            found[int(entry)] = (int(ppid), environ)
    return found


def session_leftovers() -> list[int]:
    """Processes started by this session (directly, or by a process it started, even one since killed) that
    are still alive: descendants of this process, and processes carrying this session's environment mark.
    multiprocessing's resource tracker, which lives as long as this process, is not counted."""
    me, processes = os.getpid(), _live_processes()
    mark = f"{SESSION_MARK}={me}".encode()
    started = {pid for pid, (_, environ) in processes.items() if mark in environ.split(b"\0")}
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in processes.items() if ppid == parent and pid not in started]
        started.update(children)
        frontier.extend(children)
    started.discard(me)
    started.discard(multiprocessing.resource_tracker._resource_tracker._pid)
    return sorted(started)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Fails the session (an error at teardown of its last test) when processes it started outlive it, and
    ends them. Runs in each pytest-xdist worker for the tests it ran (the controller runs no tests)."""
    os.environ[SESSION_MARK] = str(os.getpid())
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (leftovers := session_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if leftovers:
        described = "; ".join(f"{pid} {_command_line(pid)}" for pid in leftovers)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"{len(leftovers)} processes started by the tests were still alive "
                    f"{LEFTOVER_GRACE_S:.0f} s after the last test (killed now): {described}", pytrace=False)
