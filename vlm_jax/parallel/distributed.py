"""Multi-process start-up on JAX's distributed runtime.

Explicit settings (flags, or the environment that `launch/local.py` and cluster launchers set:
VLM_JAX_COORDINATOR, VLM_JAX_NUM_PROCESSES, VLM_JAX_PROCESS_ID) start `jax.distributed` with a coordinator;
on TPU VMs and recognised clusters (SLURM, ...) `jax.distributed.initialize()` finds them itself when
VLM_JAX_AUTO_DISTRIBUTED=1. CPU processes exchange collectives over gloo.

SIGTERM is a preemption notice (GKE, SLURM, spot TPU VMs and launch/local.py all send it before killing):
`PreemptionNotice` turns it into one step at which every process saves and then exits PREEMPTED_EXIT_CODE,
which the launchers restart on. A run stopped for good gets SIGKILL (or SIGINT before the notice).

A process that never joins: JAX's runtime aborts the others after the timeout without naming it. So, with an
explicit coordinator host:port, a roll call comes first: process 0 listens on port + 1 and names, in one line,
the processes that have not reported within the timeout. Every process also prints JOINING before it joins
and JOINED after, which lets launch.tpu name a worker that started but never reached the runtime.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

import jax
from jax.experimental import multihost_utils

from vlm_jax.config import ConfigError
from vlm_jax.parallel.join_markers import JOINED, JOINING


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    coordinator: str | None = None   # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = 300             # how long to wait for the coordinator and the other processes


def options_from_env(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, timeout_s: int | None = None) -> DistributedOptions:
    """Flags win over the environment; unset means one process."""
    env = os.environ
    return DistributedOptions(
        coordinator=coordinator or env.get("VLM_JAX_COORDINATOR"),
        num_processes=int(num_processes or env.get("VLM_JAX_NUM_PROCESSES", 1)),
        process_id=int(process_id if process_id is not None else env.get("VLM_JAX_PROCESS_ID", 0)),
        timeout_s=int(timeout_s or env.get("VLM_JAX_DISTRIBUTED_TIMEOUT_S", 300)))


ROLL_CALL_GO = b"all registered\n"


def roll_call_address(coordinator: str) -> tuple[str, int]:
    """(host, port + 1): where process 0 takes the roll call before the runtime opens `coordinator`."""
    host, _, port = coordinator.rpartition(":")
    return host, int(port) + 1


def take_roll_call(options: DistributedOptions) -> None:
    """Process 0: waits until every other process has reported its id, then releases them all; the processes
    missing at the timeout are named in one ConfigError line."""
    host, port = roll_call_address(options.coordinator)
    expected = set(range(1, options.num_processes))
    reported: dict[int, socket.socket] = {}
    deadline = time.monotonic() + options.timeout_s
    try:
        with socket.create_server(("", port)) as server:
            while expected - reported.keys():
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    connection, _ = server.accept()
                except TimeoutError:
                    missing = sorted(expected - reported.keys())
                    raise ConfigError(
                        f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                        f"{options.num_processes} never registered with the coordinator {host}:{port} within "
                        f"{options.timeout_s} s (not started, or stuck before joining the job)") from None
                connection.settimeout(10.0)
                try:
                    process_id = int(connection.makefile().readline())
                except (OSError, ValueError):
                    connection.close()  # not one of ours (a port scan, a health check): ignore it
                    continue
                if process_id in reported or process_id not in expected:
                    connection.close()
                    raise ConfigError(f"a second process registered as process {process_id} of "
                                      f"{options.num_processes}: check VLM_JAX_PROCESS_ID on every host")
                reported[process_id] = connection
            for connection in reported.values():
                connection.sendall(ROLL_CALL_GO)
    except OSError as e:
        raise ConfigError(f"cannot take the roll call on port {port} (the coordinator's port + 1): {e}") from None
    finally:
        for connection in reported.values():
            connection.close()


def answer_roll_call(options: DistributedOptions) -> None:
    """Processes 1..N-1: report this process's id to process 0 and wait until every process has."""
    host, port = roll_call_address(options.coordinator)
    deadline = time.monotonic() + options.timeout_s
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=1.0)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"cannot reach the coordinator {options.coordinator} (its roll call on port "
                                  f"{port}) within {options.timeout_s} s: {e}") from None
            time.sleep(0.5)
    with connection:
        try:
            connection.sendall(f"{options.process_id}\n".encode())
            connection.settimeout(max(deadline - time.monotonic(), 1.0) + 5.0)
            answer = connection.makefile("rb").readline()
        except OSError:
            answer = b""
    if answer != ROLL_CALL_GO:
        raise ConfigError(f"process 0 ended the roll call at {host}:{port} before every process registered: "
                          f"see process 0's log")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls host:port until it accepts a connection: the runtime aborts the process (no exception) when it
    cannot reach the coordinator, so check first and fail in one line."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"cannot reach the coordinator {address} within {timeout_s:g} s: {e}") from None
            time.sleep(0.5)


def join(failure: str, **initialize_args) -> None:
    """jax.distributed.initialize(**initialize_args); a failure is one ConfigError line, `failure` + the cause."""
    print(JOINING, flush=True)
    try:
        jax.distributed.initialize(**initialize_args)
        print(f"{JOINED} {jax.process_index()} of {jax.process_count()}", flush=True)
    except Exception as e:  # the runtime raises XlaRuntimeError / RuntimeError with long multi-line texts
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{failure}: {cause}") from None


def initialize(options: DistributedOptions) -> None:
    """Joins the job's processes (no-op for a single process); any failure to join is one ConfigError line."""
    if os.environ.get("VLM_JAX_AUTO_DISTRIBUTED") == "1":
        join("VLM_JAX_AUTO_DISTRIBUTED=1 but jax.distributed.initialize() could not join a job (it detects "
             "Cloud TPU VMs, SLURM, Open MPI and Kubernetes)", initialization_timeout=options.timeout_s)
        return
    if options.num_processes <= 1:
        return
    if not options.coordinator:
        raise ConfigError(f"{options.num_processes} processes need a coordinator address (host:port)")
    if not 0 <= options.process_id < options.num_processes:
        raise ConfigError(f"process id {options.process_id} is outside 0..{options.num_processes - 1}")
    if options.process_id:
        answer_roll_call(options)
        wait_for_coordinator(options.coordinator, options.timeout_s)
    else:
        take_roll_call(options)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    join(f"cannot join the job through coordinator {options.coordinator} as process {options.process_id} of "
         f"{options.num_processes} within {options.timeout_s} s", coordinator_address=options.coordinator,
         num_processes=options.num_processes, process_id=options.process_id,
         initialization_timeout=options.timeout_s)


PREEMPTED_EXIT_CODE = 42  # a checkpoint was saved after SIGTERM: restart the job (xpk restarts on 42 and 127-255)


class Preempted(Exception):
    """Every process saved at `step` after a preemption notice; the process exits PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}")
        self.step = step


class PreemptionNotice:
    """Whether training should stop and save at a step because SIGTERM arrived (at any process).

    With jax.distributed, JAX's preemption service (on by default: `jax_enable_preemption_service`) catches
    SIGTERM in C++, spreads the notice through the coordinator, and `reached_preemption_sync_point(step)` is
    true on every process at the same step: one past the furthest step any process had reached. It must be
    asked at every step, from the same first step on all processes. A Python SIGTERM handler would displace
    JAX's, so none is installed. With one process, a Python handler records SIGTERM and the next step
    boundary is the stop. Repeated SIGTERMs change nothing; once the stop is reached SIGINT is ignored, so
    the save in progress is not cut short (SIGKILL still is, and orbax's atomic commit keeps the previous
    checkpoint whole). Construct it in the main thread, after `initialize`.
    """

    def __init__(self) -> None:
        self.distributed = jax.distributed.is_initialized()
        self.received = False
        if not self.distributed:
            signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """True at the step to save and stop at (the same on all processes); call it after every step."""
        stop = multihost_utils.reached_preemption_sync_point(step) if self.distributed else self.received
        if stop:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return stop
