"""Starts N local processes of one command as a multi-host JAX job on this machine (CPU devices, gloo).

    python -m launch.local --processes 2 --devices-per-process 4 -- \
        python -m vlm_jax.train --config=configs/demo/clip_tiny.py --workdir=/tmp/run

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS with its device count, and VLM_JAX_COORDINATOR /
VLM_JAX_NUM_PROCESSES / VLM_JAX_PROCESS_ID, which vlm_jax.train reads. Output lines are prefixed with the
process id. If one process fails, the others are stopped; the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch(command: list[str], processes: int, devices_per_process: int, timeout_s: float | None = None) -> int:
    """Runs `command` as `processes` cooperating processes; returns the job's exit status."""
    port = free_port()
    children = [subprocess.Popen(command, env=process_env(i, processes, devices_per_process, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(processes)]
    relays = [threading.Thread(target=relay, args=(i, child.stdout, sys.stdout), daemon=True)
              for i, child in enumerate(children)]
    for thread in relays:
        thread.start()
    status = 0
    try:
        for child in children:
            code = child.wait(timeout=timeout_s)
            if code and not status:
                status = code
                for other in children:
                    if other.poll() is None:
                        other.kill()
    except subprocess.TimeoutExpired:
        status = 124
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        for thread in relays:
            thread.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m launch.local --processes N [--devices-per-process D] -- COMMAND...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=None)
    args = parser.parse_args(argv[:split])
    return launch(argv[split + 1:], args.processes, args.devices_per_process, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
