"""Runs a training command on a Cloud TPU pod (one slice or several) from a laptop, through gcloud.

    python -m launch.tpu up    NAME --accelerator-type=v5p-256 [--node-count=2] [--spot | --reserved | --best-effort]
                               [--zone=Z] [--project=P] [--stage=gs://BUCKET/DIR]
    python -m launch.tpu run   NAME [--env K=V ...] -- python -m vlm_jax.train --config=... --workdir=gs://...
    python -m launch.tpu logs  NAME [--worker=K] [--tail=50]
    python -m launch.tpu stop  NAME
    python -m launch.tpu down  NAME

`up` requests a queued resource (multislice with --node-count) and waits until it is ACTIVE; it remembers the
pod's settings in LOGS/NAME/pod.json, so later commands need only the name (flags override them).
`run` ships this checkout (setup.py, vlm_jax/, data_pipelines/, configs/, launch/ and --include paths; git's
tracked and untracked, non-ignored files) as a tarball, by scp or through the --stage gs:// folder, unpacks it
on every worker, rebuilds the worker's venv (`pip install -e .[tpu]`) only when setup.py changed, then starts
the command on every worker at once with VLM_JAX_AUTO_DISTRIBUTED=1 (jax.distributed finds the pod itself).
Each worker first stops what a previous run left (its processes, anything holding the TPU, libtpu's
lockfile). Worker K's output goes to LOGS/NAME/worker-K.log; worker 0's is also printed. When a worker fails,
or one has not started within --start-timeout-s, every worker is stopped and one line names that worker; the
exit status is the failed worker's (124 for a start timeout, 128 + N after signal N to the launcher).
`logs` fetches every worker's log again (e.g. after the laptop lost its connection: runs survive that),
`stop` ends the run and keeps the TPUs, `down` deletes the queued resource and its TPU VMs.
--dry-run prints every gcloud command (one per line, shell-quoted) instead of running it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

from launch import tpu_commands as gc
from launch.local import exit_status, signals_recorded
from launch.tpu_worker import STARTED
from vlm_jax.parallel.join_markers import JOINING
from vlm_jax.parallel.topology import TopologyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("setup.py", "vlm_jax", "data_pipelines", "configs", "launch")
SETTINGS = ("accelerator_type", "node_count", "zone", "project", "runtime_version", "stage")
SETUP_TIMEOUT_S = 1800.0
POLL_S = 0.1


class LaunchError(Exception):
    """A one-line reason the launcher stops."""


CAUSES = (re.compile(r"error: "), re.compile(r"ERROR: "), re.compile(r"F\d{4} "),   # ours, gcloud's, absl fatal
          re.compile(r"\w+(Error|Exception|Interrupt): "))                         # a Python exception


def last_line(text: str, limit: int = 300) -> str:
    """The line of `text` that best states why it ended: the last one of the first kind in CAUSES found,
    or else its last non-empty line that is not a stack frame."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("@ ")]
    for cause in CAUSES:
        matches = [line for line in lines if cause.match(line)]
        if matches:
            return matches[-1][:limit]
    return (lines or [""])[-1][:limit]


def short(command: list[str]) -> str:
    """A command without its (long) remote script, for messages."""
    return shlex.join(part for part in command if not part.startswith("--command="))


@dataclasses.dataclass
class Gcloud:
    """Runs gcloud commands, or prints them (shell-quoted, one per line) under --dry-run."""
    dry_run: bool

    def call(self, command: list[str], timeout_s: float | None = None) -> str:
        if self.dry_run:
            print(shlex.join(command), flush=True)
            return ""
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"`{short(command)}` did not finish within {timeout_s:g} s") from None
        if result.returncode:
            raise LaunchError(f"`{short(command)}` failed with exit status {result.returncode}: "
                              f"{last_line(result.stderr + result.stdout)}")
        return result.stdout

    def call_all(self, commands: list[list[str]], timeout_s: float | None = None) -> None:
        """Runs the commands at once (printed in order under --dry-run); raises the first failure."""
        if self.dry_run or len(commands) == 1:
            for command in commands:
                self.call(command, timeout_s)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            for future in [pool.submit(self.call, command, timeout_s) for command in commands]:
                future.result()


def note(message: str) -> None:
    print(f"launch.tpu: {message}", file=sys.stderr, flush=True)


def settings_file(args: argparse.Namespace) -> str:
    return os.path.join(args.logs_dir, args.name, "pod.json")


def load_pod(args: argparse.Namespace) -> gc.Pod:
    """The pod from the flags, completed by what `up` saved."""
    saved = {}
    if os.path.exists(settings_file(args)):
        with open(settings_file(args)) as f:
            saved = json.load(f)
    for key in SETTINGS:
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key))
    if args.accelerator_type is None:
        raise LaunchError(f"no settings for pod {args.name!r} in {settings_file(args)}: run `up` first or pass "
                          "--accelerator-type")
    try:
        return gc.make_pod(args.name, args.accelerator_type, args.node_count or 1, args.zone, args.project,
                           args.runtime_version)
    except TopologyError as e:
        raise LaunchError(str(e)) from None


def save_pod(args: argparse.Namespace) -> None:
    os.makedirs(os.path.dirname(settings_file(args)), exist_ok=True)
    with open(settings_file(args), "w") as f:
        json.dump({key: getattr(args, key) for key in SETTINGS}, f, indent=1)


def up(args: argparse.Namespace, gcloud: Gcloud) -> int:
    pod = load_pod(args)
    gcloud.call(gc.create(pod, args.provisioning))
    if not gcloud.dry_run:
        save_pod(args)
    wait_until_active(pod, gcloud, args.wait_timeout_s, args.poll_s)
    return 0


def wait_until_active(pod: gc.Pod, gcloud: Gcloud, timeout_s: float | None, poll_s: float) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state = None
    while True:
        previous, state = state, gcloud.call(gc.describe(pod), timeout_s=120).strip()
        if gcloud.dry_run or state == "ACTIVE":
            return
        if state != previous:
            note(f"queued resource {pod.name} is {state}")
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {pod.name} is {state} (`down` deletes it)")
        if deadline is not None and time.monotonic() >= deadline:
            raise LaunchError(f"queued resource {pod.name} is still {state} after {timeout_s:g} s (it stays "
                              "queued; `down` deletes it)")
        time.sleep(poll_s)


def checkout_files(include: list[str]) -> list[str]:
    """The checkout's files under SHIPPED and `include` that git tracks or would track."""
    result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                             *SHIPPED, *include], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise LaunchError(f"cannot list the checkout's files (git ls-files): {last_line(result.stderr)}")
    return sorted({path for path in result.stdout.split("\0") if os.path.isfile(os.path.join(ROOT, path))})


def make_tarball(path: str, files: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name in files:
            tar.add(os.path.join(ROOT, name), arcname=name)


def run(args: argparse.Namespace, gcloud: Gcloud) -> int:
    pod = load_pod(args)
    tarball = os.path.join(args.logs_dir, args.name, "checkout.tar.gz")
    if not gcloud.dry_run:
        files = checkout_files(args.include)
        make_tarball(tarball, files)
        note(f"shipping {len(files)} files ({os.path.getsize(tarball) / 1e6:.1f} MB) to {pod.workers} workers")
    copies, setups = gc.ship(pod, tarball, args.stage, args.python)
    gcloud.call_all(copies, SETUP_TIMEOUT_S)
    gcloud.call_all(setups, SETUP_TIMEOUT_S)
    env = {"VLM_JAX_DISTRIBUTED_TIMEOUT_S": f"{args.join_timeout_s:g}", **dict(args.env)}
    script = gc.start_script(args.command, env, args.grace_s)
    if gcloud.dry_run:
        for k in range(pod.workers):
            gcloud.call(gc.start(pod, k, script))
        return 0
    return Job(pod, script, os.path.join(args.logs_dir, args.name)).run(gcloud, args.start_timeout_s, args.grace_s)


@dataclasses.dataclass
class Worker:
    """The local ssh process of one worker and the thread copying its output to its log file."""
    process: subprocess.Popen
    log_path: str
    echo: bool  # worker 0's output is also printed
    started: threading.Event = dataclasses.field(default_factory=threading.Event)
    joining: threading.Event = dataclasses.field(default_factory=threading.Event)  # reached jax.distributed
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.relay, daemon=True)
        self.thread.start()

    def relay(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                if STARTED in line:
                    self.started.set()
                if JOINING in line:
                    self.joining.set()
                if self.echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()


@dataclasses.dataclass
class Job:
    pod: gc.Pod
    script: str
    logs: str

    def run(self, gcloud: Gcloud, start_timeout_s: float, grace_s: float) -> int:
        """Starts every worker, watches them all, stops them all on the first failure; the job's status."""
        received: list[int] = []
        workers: list[Worker] = []
        status, failure = 1, None
        note(f"starting {self.pod.workers} workers; worker 0's output follows, every worker's is in "
             f"{self.logs}/worker-K.log")
        with signals_recorded(received):
            try:
                for k in range(self.pod.workers):
                    process = subprocess.Popen(gc.start(self.pod, k, self.script), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, errors="replace",
                                               start_new_session=True)
                    workers.append(Worker(process, os.path.join(self.logs, f"worker-{k}.log"), echo=k == 0))
                    workers[-1].start()
                status, failure = self.watch(workers, start_timeout_s, received)
            finally:
                if status:
                    self.stop_all(gcloud, workers, grace_s)
                for worker in workers:
                    worker.thread.join(timeout=10)
        if failure is not None:
            print(f"error: {failure}", file=sys.stderr, flush=True)
        else:
            note(f"all {self.pod.workers} workers finished; logs in {self.logs}/")
        return status

    def watch(self, workers: list[Worker], start_timeout_s: float, received: list[int]) -> tuple[int, str | None]:
        """Polls the workers until all succeed, one fails, one has not started in time, or a signal comes."""
        deadline = time.monotonic() + start_timeout_s
        while True:
            if received:
                return 128 + received[0], f"stopped every worker on signal {received[0]}"
            codes = [worker.process.poll() for worker in workers]
            for k, code in enumerate(codes):
                if code:
                    return exit_status(code), self.failure(workers, k, exit_status(code))
            if all(code == 0 for code in codes):
                return 0, None
            late = [k for k, worker in enumerate(workers) if not worker.started.is_set() and codes[k] is None]
            if late and time.monotonic() >= deadline:
                others = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
                return 124, self.failed(workers, late[0], f"did not start within {start_timeout_s:g} s{others}")
            time.sleep(POLL_S)

    def failure(self, workers: list[Worker], k: int, status: int) -> str:
        """Names worker k, or the worker it waited for: when k failed inside jax.distributed while another
        started worker never reached it (JAX's runtime ends the waiting ones without naming the missing one)."""
        silent = [j for j, worker in enumerate(workers) if j != k and not worker.joining.is_set()]
        if workers[k].joining.is_set() and silent:
            return self.failed(workers, silent[0], f"never registered with the coordinator (it did not reach "
                                                   f"jax.distributed); {self.pod.describe(k)} gave up waiting "
                                                   f"with exit status {status}")
        return self.failed(workers, k, f"failed with exit status {status}")

    def failed(self, workers: list[Worker], k: int, what: str) -> str:
        if workers[k].process.poll() is not None:
            workers[k].thread.join(timeout=5)  # its last lines
        with open(workers[k].log_path) as f:
            last = last_line(f.read())
        return (f"{self.pod.describe(k)} {what}; stopped every worker; log {workers[k].log_path}"
                + (f": {last}" if last else ""))

    def stop_all(self, gcloud: Gcloud, workers: list[Worker], grace_s: float) -> None:
        """Stops the run on every worker, then ends the local ssh processes still waiting."""
        note("stopping every worker")
        try:
            gcloud.call_all(gc.stop(self.pod, grace_s), timeout_s=grace_s + 60)
        except LaunchError as e:
            note(f"could not stop every worker: {e}")
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()


def logs(args: argparse.Namespace, gcloud: Gcloud) -> int:
    pod = load_pod(args)
    folder = os.path.join(args.logs_dir, args.name)
    workers = range(pod.workers) if args.worker is None else [args.worker]
    paths = {k: os.path.join(folder, f"worker-{k}.log") for k in workers}
    if not gcloud.dry_run:
        os.makedirs(folder, exist_ok=True)
    gcloud.call_all([gc.fetch_log(pod, k, paths[k]) for k in workers], timeout_s=600)
    if not gcloud.dry_run:
        shown = workers[0]
        with open(paths[shown]) as f:
            sys.stdout.writelines(f.readlines()[-args.tail:])
        note(f"the last {args.tail} lines of worker {shown}'s log; every fetched log is in {folder}/")
    return 0


def stop(args: argparse.Namespace, gcloud: Gcloud) -> int:
    gcloud.call_all(gc.stop(load_pod(args), args.grace_s), timeout_s=args.grace_s + 60)
    return 0


def down(args: argparse.Namespace, gcloud: Gcloud) -> int:
    gcloud.call(gc.delete(load_pod(args)))
    if not gcloud.dry_run:
        with contextlib.suppress(FileNotFoundError):
            os.remove(settings_file(args))
    return 0


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the queued resource (and TPU VM name, or prefix for multislice)")
    common.add_argument("--accelerator-type", help="v5p-256, v6e-256, v5e-8 (= v5litepod-8), v4-16, ...")
    common.add_argument("--node-count", type=int, help="slices (multislice; default 1)")
    common.add_argument("--zone")
    common.add_argument("--project")
    common.add_argument("--runtime-version", help="default: the generation's (v6e v2-alpha-tpuv6e, ...)")
    common.add_argument("--stage", help="a gs:// folder to ship the checkout through (default: scp)")
    common.add_argument("--logs-dir", default="logs", help="local folder of LOGS/NAME/ (default: logs)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead")
    commands = main_parser.add_subparsers(dest="action", required=True)
    up_parser = commands.add_parser("up", parents=[common], help="request the TPUs and wait until ready")
    kinds = up_parser.add_mutually_exclusive_group()
    for kind in gc.PROVISIONING:
        kinds.add_argument(f"--{kind}", dest="provisioning", action="store_const", const=kind)
    up_parser.add_argument("--wait-timeout-s", type=float, help="give up waiting after this long")
    up_parser.add_argument("--poll-s", type=float, default=30.0)
    run_parser = commands.add_parser("run", parents=[common], help="ship the checkout and run a command")
    run_parser.add_argument("--include", action="append", default=[], help="more paths to ship")
    run_parser.add_argument("--python", default="3.11", help="the workers' Python version (default 3.11)")
    run_parser.add_argument("--env", action="append", default=[], type=key_value, help="KEY=VALUE for the command")
    run_parser.add_argument("--start-timeout-s", type=float, default=600.0)
    run_parser.add_argument("--join-timeout-s", type=float, default=300.0,
                            help="jax.distributed's wait for every worker (VLM_JAX_DISTRIBUTED_TIMEOUT_S)")
    run_parser.add_argument("--grace-s", type=float, default=30.0, help="between SIGTERM and SIGKILL on a stop")
    logs_parser = commands.add_parser("logs", parents=[common], help="fetch every worker's log")
    logs_parser.add_argument("--worker", type=int, help="only this worker's")
    logs_parser.add_argument("--tail", type=int, default=50, help="lines of the first fetched log to print")
    stop_parser = commands.add_parser("stop", parents=[common], help="stop the run, keep the TPUs")
    stop_parser.add_argument("--grace-s", type=float, default=30.0)
    commands.add_parser("down", parents=[common], help="delete the queued resource and its TPU VMs")
    return main_parser


ACTIONS = {"up": up, "run": run, "logs": logs, "stop": stop, "down": down}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:split])
    args.command = argv[split + 1:]
    if args.action == "run" and not args.command:
        parser().error("run needs a command after --")
    try:
        if not args.dry_run and shutil.which("gcloud") is None:
            raise LaunchError("gcloud is not on PATH: install the Google Cloud SDK "
                              "(https://cloud.google.com/sdk/docs/install), or use --dry-run")
        return ACTIONS[args.action](args, Gcloud(args.dry_run))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
