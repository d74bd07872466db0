"""Starts N local processes of one command as a multi-host JAX job on this machine (CPU devices, gloo).

    python -m launch.local --processes 2 --devices-per-process 4 -- \
        python -m vlm_jax.train --config=configs/demo/clip_tiny.py --workdir=/tmp/run

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS with its device count, and VLM_JAX_COORDINATOR /
VLM_JAX_NUM_PROCESSES / VLM_JAX_PROCESS_ID, which vlm_jax.train reads. Output lines are prefixed with the
process id. Every process runs in its own process group (with whatever it starts, e.g. grain data workers).
The launcher watches all of them at once: when one fails, on the launcher's timeout (status 124) and on
SIGTERM / Ctrl-C to the launcher (128 + signal), every process gets SIGTERM, then every group SIGKILL after
--grace-s (10 s), or as soon as the processes have exited. SIGTERM goes to the processes only, not their
groups: for vlm_jax.train it is a preemption notice (all processes save at the same next step and exit 42), and
its data workers must live until then. A tiny model's save takes about a second; give a big one a longer grace.
The job's exit status is the first failure's (128 + N for a process killed by signal N; 42 for a preempted
trainer, which a restart of the same command resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

POLL_S = 0.05


def free_coordinator_port() -> int:
    """A free port P on 127.0.0.1 whose P + 1 (the roll call's) is free too."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def process_env(index: int, count: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
               VLM_JAX_COORDINATOR=f"127.0.0.1:{port}", VLM_JAX_NUM_PROCESSES=str(count),
               VLM_JAX_PROCESS_ID=str(index))
    return env


def relay(index: int, stream, sink) -> None:
    for line in stream:
        sink.write(f"[{index}] {line}")
        sink.flush()


def exit_status(returncode: int) -> int:
    """A shell-style status: a process killed by signal N (Popen's -N) counts as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def signals_recorded(received: list[int]) -> Iterator[None]:
    """Records SIGTERM / SIGINT sent to the launcher in `received` instead of dying (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_groups(children: list[subprocess.Popen], sig: int) -> None:
    """Sends `sig` to each child's process group (the group outlives its leader while members remain)."""
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)


def stop_all(children: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every process (not its group), SIGKILL to every group after `grace_s` (or once the processes
    are gone)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(child.poll() is None for child in children) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    signal_groups(children, signal.SIGKILL)
    for child in children:
        child.wait()


def watch(children: list[subprocess.Popen], timeout_s: float | None, received: list[int]) -> int:
    """Polls every child until all succeed (0), one fails (its status), the timeout passes (124) or the
    launcher gets a signal (128 + signal)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if received:
            return 128 + received[0]
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code]
        if failed:
            return exit_status(failed[0])
        if all(code == 0 for code in codes):
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            return 124
        time.sleep(POLL_S)


def launch(command: list[str], processes: int, devices_per_process: int, timeout_s: float | None = None,
           grace_s: float = 10.0) -> int:
    """Runs `command` as `processes` cooperating processes; returns the job's exit status. No process of the
    job (nor anything it started) outlives the call."""
    port = free_coordinator_port()
    received: list[int] = []
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    with signals_recorded(received):
        try:
            for i in range(processes):
                child = subprocess.Popen(command, env=process_env(i, processes, devices_per_process, port),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
                children.append(child)
                relays.append(threading.Thread(target=relay, args=(i, child.stdout, sys.stdout), daemon=True))
                relays[-1].start()
            return watch(children, timeout_s, received)
        finally:
            stop_all(children, grace_s)
            for thread in relays:
                thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv[-1] == "--":
        print("usage: python -m launch.local --processes N [--devices-per-process D] [--timeout-s S] "
              "[--grace-s S] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=None, help="stop the job after this long (status 124)")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="how long stopped processes get between SIGTERM and SIGKILL")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    try:
        return launch(command, args.processes, args.devices_per_process, args.timeout_s, args.grace_s)
    except OSError as e:  # the command cannot be started (missing, not executable)
        print(f"error: cannot start {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
