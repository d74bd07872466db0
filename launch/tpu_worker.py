"""The worker side of launch/tpu.py: runs on every TPU VM worker, from the shipped checkout.

    python3 -m launch.tpu_worker start [--grace-s 30] -- python -m vlm_jax.train ...
    python3 -m launch.tpu_worker stop [--grace-s 30]

`start` first clears what a previous run left: the run recorded in the pid file (its whole process group),
any process still holding the TPU (/dev/accel*, /dev/vfio/N; through `sudo -n fuser -k`) and libtpu's
lockfile (`libtpu_lockfile` in the temporary directory, /tmp on TPU VMs). It then records itself in the pid
file, prints STARTED, and runs the command with the pod's venv first on PATH, copying its output to stdout
and to the worker's log file (which outlives a dropped ssh connection). Its exit status is the command's
(128 + N for a command killed by signal N). `stop` ends the recorded run: SIGTERM to its process group, SIGKILL
after the grace period. Standard library only: it runs under the system python3 of the TPU VM image.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

STARTED = "launch.tpu_worker: started"
HOME = os.path.expanduser("~")
POD_DIR = os.path.join(HOME, "vlm_jax_pod")          # checkout (src/), venv/, run.pid, run.log
PID_FILE = os.path.join(POD_DIR, "run.pid")
LOG_FILE = os.path.join(POD_DIR, "run.log")
VENV_BIN = os.path.join(POD_DIR, "venv", "bin")
TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def recorded_run() -> int | None:
    """The process group leader in the pid file, if it is still that process (not a reused pid)."""
    try:
        with open(PID_FILE) as f:
            pid, started = f.read().split()
    except (OSError, ValueError):
        return None
    return int(pid) if start_time(int(pid)) == started else None


def stop(grace_s: float) -> None:
    """SIGTERM to the recorded run's process group, SIGKILL after `grace_s`; removes the pid file."""
    pid = recorded_run()
    if pid is not None and pid != os.getpid():
        print(f"launch.tpu_worker: stopping process group {pid}", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.remove(PID_FILE)


def clear_tpu() -> None:
    """Ends processes holding the TPU devices and removes libtpu's lockfile."""
    devices = sorted(path for pattern in TPU_DEVICES for path in glob.glob(pattern))
    if devices:
        subprocess.run(["sudo", "-n", "fuser", "-k", "-9", *devices], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    lockfile = os.path.join(tempfile.gettempdir(), "libtpu_lockfile")
    if os.path.exists(lockfile):
        print(f"launch.tpu_worker: removing {lockfile}", flush=True)
        try:
            os.remove(lockfile)
        except PermissionError:
            subprocess.run(["sudo", "-n", "rm", "-f", lockfile], check=False)


def record_self() -> None:
    """Makes this process a process group leader (unless it is one) and writes it to the pid file."""
    if os.getpgrp() != os.getpid():
        os.setsid()
    os.makedirs(POD_DIR, exist_ok=True)
    with open(PID_FILE + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {start_time(os.getpid())}")
    os.replace(PID_FILE + ".tmp", PID_FILE)


def relay(child: subprocess.Popen, log) -> None:
    """Copies the child's output to the log file and to stdout (a broken stdout only stops the copy there)."""
    to_stdout = True
    for line in child.stdout:
        log.write(line)
        log.flush()
        if to_stdout:
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            except OSError:
                to_stdout = False


def run(command: list[str], grace_s: float) -> int:
    stop(grace_s)
    clear_tpu()
    record_self()
    # SIGTERM reaches the whole group; this process outlives the command to relay its last words (a handler,
    # unlike SIG_IGN, is not inherited by the command).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGHUP, lambda signum, frame: None)
    print(STARTED, flush=True)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", VIRTUAL_ENV=os.path.dirname(VENV_BIN))
    try:
        with open(LOG_FILE, "wb") as log:
            child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            relay(child, log)
            code = child.wait()
    except OSError as e:
        print(f"error: cannot start {command[0]!r}: {e.strerror}", flush=True)
        return 127
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(PID_FILE)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        argv, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--grace-s", type=float, default=30.0, help="between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(args.grace_s)
        return 0
    if not command:
        parser.error("start needs a command after --")
    return run(command, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
