"""Runs a grid of config overrides as named runs, each with its own workdir, through any command.

    python -m launch.sweep --sweep optim.lr=1e-3,3e-4 --sweep batch_size=256,512 --workdir-root runs/lr_bs \
        [--parallel 2] [--dry-run] -- \
        python -m vlm_jax.train --config=configs/demo/clip_tiny.py:demo_out/data --workdir={workdir}

Every combination (the first --sweep varies slowest) is one run. Its name comes from the values, e.g.
`lr1e-3-batch-size256`: each key's last part and its value, lower-case, '_' -> '-', '.' -> 'p', anything else
outside [a-z0-9-] -> '-', so it is a valid directory name and Kubernetes name. In COMMAND, {name} becomes the run's
name and {workdir} becomes ROOT/name; the run's overrides are appended as --config.KEY=VALUE, so COMMAND must end
with the trainer's arguments. That makes any launcher a sweep launcher:

    python -m launch.sweep --sweep optim.lr=1e-3,3e-4 -- \
        python -m launch.gke --name clip-{name} --image IMAGE --tpu v5p-256 -- \
        python -m vlm_jax.train --config=configs/paper/clip_b16.py --workdir=gs://BUCKET/sweep/{name}

(python -m launch.slurm --job-name {name} ... and python -m launch.local ... work the same way.)
Runs go one after another, or --parallel N at a time; output lines carry the run's name; a failed run does not
stop the others. The exit status is the first failed run's (0 when all succeed); SIGTERM / Ctrl-C stops the
running ones (SIGTERM, then SIGKILL after --grace-s) and starts no more. --dry-run prints one command per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import shlex
import subprocess
import sys
import threading
import time

from launch.cluster_cli import UsageError, fail, require_command, split_command
from launch.local import POLL_S, exit_status, relay, signals_recorded, stop_all

USAGE = ("python -m launch.sweep --sweep KEY=V1,V2[,...] [--sweep ...] [--workdir-root ROOT] [--parallel N] "
         "[--dry-run] -- COMMAND... (with {name} or {workdir})")
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple[tuple[str, str], ...]
    command: tuple[str, ...]


def parse_sweep(item: str) -> tuple[str, list[str]]:
    """'optim.lr=1e-3,3e-4' -> ('optim.lr', ['1e-3', '3e-4'])."""
    key, sep, values = item.partition("=")
    if not sep or not KEY.fullmatch(key):
        raise UsageError(f"--sweep {item!r} is not KEY=V1,V2,... with a config key such as optim.lr")
    split = values.split(",")
    if "" in split:
        raise UsageError(f"--sweep {item!r} has an empty value")
    if len(set(split)) < len(split):
        raise UsageError(f"--sweep {item!r} repeats a value")
    return key, split


def slug(text: str) -> str:
    text = text.lower().replace("_", "-").replace(".", "p")
    return re.sub(r"[^a-z0-9-]+", "-", text)


def run_name(overrides: tuple[tuple[str, str], ...]) -> str:
    """(('optim.lr', '1e-3'), ('batch_size', '256')) -> 'lr1e-3-batch-size256'."""
    name = "-".join(slug(key.rsplit(".", 1)[-1]) + slug(value) for key, value in overrides)
    return re.sub(r"-+", "-", name).strip("-")


def expand(sweeps: list[str], command: list[str], workdir_root: str | None) -> list[Run]:
    """Every combination of the --sweep values as a Run with its name, workdir and command."""
    if not sweeps:
        raise UsageError("give at least one --sweep KEY=V1,V2")
    grid = [parse_sweep(item) for item in sweeps]
    keys = [key for key, _ in grid]
    if len(set(keys)) < len(keys):
        raise UsageError(f"a key is swept twice: {', '.join(keys)}")
    uses_workdir = any("{workdir}" in arg for arg in command)
    if not uses_workdir and not any("{name}" in arg for arg in command):
        raise UsageError("the command must contain {workdir} or {name}, so that each run has its own workdir")
    if uses_workdir and not workdir_root:
        raise UsageError("{workdir} in the command needs --workdir-root")
    runs, seen = [], {}
    for values in itertools.product(*(values for _, values in grid)):
        overrides = tuple(zip(keys, values))
        name = run_name(overrides)
        if name in seen:
            raise UsageError(f"runs {dict(seen[name])} and {dict(overrides)} would both be named {name!r}")
        seen[name] = overrides
        workdir = f"{workdir_root.rstrip('/')}/{name}" if workdir_root else ""
        filled = [arg.replace("{name}", name).replace("{workdir}", workdir) for arg in command]
        runs.append(Run(name, overrides, tuple(filled + [f"--config.{key}={value}" for key, value in overrides])))
    return runs


def start(run: Run, relays: list[threading.Thread]) -> subprocess.Popen | int:
    """Starts the run in its own process group with its output relayed; 127 when it cannot start."""
    try:
        child = subprocess.Popen(run.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    except OSError as e:
        print(f"[{run.name}] cannot start {run.command[0]!r}: {e.strerror}", flush=True)
        return 127
    relays.append(threading.Thread(target=relay, args=(run.name, child.stdout, sys.stdout), daemon=True))
    relays[-1].start()
    return child


def run_all(runs: list[Run], parallel: int, grace_s: float) -> tuple[dict[str, int], list[int]]:
    """Runs up to `parallel` at a time; returns ({name: exit status} of the runs that ended, signals received)."""
    pending, active, statuses = list(runs), {}, {}
    received: list[int] = []
    relays: list[threading.Thread] = []
    with signals_recorded(received):
        try:
            while (pending or active) and not received:
                while pending and len(active) < parallel:
                    run = pending.pop(0)
                    child = start(run, relays)
                    if isinstance(child, int):
                        statuses[run.name] = child
                    else:
                        active[run.name] = child
                for name, child in list(active.items()):
                    if child.poll() is not None:
                        statuses[name] = exit_status(active.pop(name).returncode)
                        print(f"sweep: {name} ended with status {statuses[name]}", flush=True)
                time.sleep(POLL_S)
        finally:
            stop_all(list(active.values()), grace_s)
            for thread in relays:
                thread.join(timeout=5)
    return statuses, received


def report(runs: list[Run], statuses: dict[str, int], received: list[int]) -> int:
    """Prints one summary line; the sweep's exit status."""
    failed = [f"{run.name} ({statuses[run.name]})" for run in runs if statuses.get(run.name, 0)]
    not_run = [run.name for run in runs if run.name not in statuses]
    print(f"sweep: {sum(not code for code in statuses.values())} of {len(runs)} runs succeeded"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; not finished: {', '.join(not_run)}" if not_run else ""), flush=True)
    if received:
        return 128 + received[0]
    return next((statuses[run.name] for run in runs if statuses.get(run.name, 0)), 0)


def parse_args(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", usage=USAGE, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and its values (repeatable: the grid is every combination)")
    parser.add_argument("--workdir-root", default=None, help="{workdir} is ROOT/RUN_NAME")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM -> SIGKILL delay when stopping runs")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command instead of running it")
    args = parser.parse_args(flags)
    if args.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, command = split_command(argv)
        args = parse_args(flags)
        require_command(command, USAGE)
        runs = expand(args.sweep, command, args.workdir_root)
    except UsageError as e:
        return fail(str(e))
    if args.dry_run:
        print("\n".join(shlex.join(run.command) for run in runs))
        return 0
    return report(runs, *run_all(runs, args.parallel, args.grace_s))


if __name__ == "__main__":
    sys.exit(main())
