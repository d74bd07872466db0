"""Runs a training command on SLURM GPU nodes: writes an sbatch script and submits it (`sbatch` reads it from
standard input), or prints it under --dry-run.

    python -m launch.slurm --job-name clip-b16 --nodes 2 --gpus-per-node 8 [--partition P] [--time 24:00:00] \
        [--setup 'source .venv/bin/activate'] [--dry-run] -- \
        python -m vlm_jax.train --config=configs/paper/clip_b16.py --workdir=/shared/runs/clip-b16

One task per node (`srun --ntasks-per-node=1`), each one jax.distributed process over all of its node's GPUs. The
script sets VLM_JAX_COORDINATOR (the job's first node, at the port jax's own SLURM detection picks) and
VLM_JAX_NUM_PROCESSES, and each task its VLM_JAX_PROCESS_ID from SLURM_PROCID: jax's automatic SLURM detection
(VLM_JAX_AUTO_DISTRIBUTED=1) would give each process only GPU number SLURM_LOCALID, i.e. one GPU per node here.
`--signal=TERM@S` sends SIGTERM to the trainer S seconds before the time limit (preemption sends it too); a trainer
that saves and exits 42 (or dies by a signal, 128-255) gets the job requeued, up to --max-restarts times
(SLURM_RESTART_COUNT), and resumes from its workdir. The log is %x-%j.out in the submit directory, appended to
across restarts. The job runs in the directory sbatch was called from (the checkout, on a shared filesystem).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

from launch.cluster_cli import (SAVED_EXIT_CODE, SIGNAL_EXIT_CODES, UsageError, fail, parse_env, require_command,
                                require_tool, split_command, submit)

USAGE = ("python -m launch.slurm --job-name NAME --nodes N [--gpus-per-node G] [--partition P] [--time T] "
         "[--dry-run] -- COMMAND...")
# The port jax's SlurmCluster derives from the job id (its ephemeral range 61440-65535).
COORDINATOR = ('"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
               ':$((SLURM_JOB_ID % 4096 + 61440))"')
TASK_WRAPPER = 'export VLM_JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'


def directives(args: argparse.Namespace) -> list[str]:
    gpus = f"{args.gpu_type}:{args.gpus_per_node}" if args.gpu_type else str(args.gpus_per_node)
    options = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={gpus}", "--exclusive", f"--time={args.time}", f"--signal=TERM@{args.signal_s}",
               "--requeue", "--open-mode=append", "--output=%x-%j.out"]
    options += [f"--{name}={value}" for name, value in (("cpus-per-task", args.cpus_per_task),
                                                         ("partition", args.partition), ("account", args.account))
                if value]
    return [f"#SBATCH {option}" for option in options + args.sbatch_arg]


def script(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> str:
    srun = ["srun", f"--nodes={args.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--wait=60"]
    if args.cpus_per_task:
        srun.append(f"--cpus-per-task={args.cpus_per_task}")  # srun does not inherit it from sbatch
    lines = [
        "#!/bin/bash", *directives(args),
        "# Written by python -m launch.slurm. SIGTERM reaches the trainer before the time limit or on preemption;",
        "# it saves and exits 42, and the job is requeued to resume from its workdir.",
        *args.setup,
        *[f"export {key}={shlex.quote(value)}" for key, value in env.items()],
        f"export VLM_JAX_COORDINATOR={COORDINATOR}",
        'export VLM_JAX_NUM_PROCESSES="$SLURM_JOB_NUM_NODES"',
        "# srun --wait=60: once one task has ended, the others get 60 s to finish before they are killed.",
        f"{shlex.join(srun)} bash -c {shlex.quote(TASK_WRAPPER)} launch.slurm {shlex.join(command)}",
        "status=$?",
        'restarts="${SLURM_RESTART_COUNT:-0}"',
        f'if {{ [ "$status" -eq {SAVED_EXIT_CODE} ] || [ "$status" -ge {SIGNAL_EXIT_CODES.start} ]; }} '
        f'&& [ "$restarts" -lt {args.max_restarts} ]; then',
        f'  echo "launch.slurm: exit $status; requeueing (restart $((restarts + 1)) of {args.max_restarts})" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def parse_args(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", usage=USAGE, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-name", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-type", default=None, help="the cluster's GRES type name, e.g. h100 (site-specific)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's process")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default="24:00:00", help="time limit per (re)start")
    parser.add_argument("--signal-s", type=int, default=120, help="SIGTERM this long before the time limit")
    parser.add_argument("--max-restarts", type=int, default=3, help="requeues on exit 42 or a signal")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported to every task")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch-arg=--qos=high (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    args = parser.parse_args(flags)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.max_restarts < 0:
        raise UsageError("--nodes and --gpus-per-node must be at least 1, --max-restarts at least 0")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.job_name):
        raise UsageError(f"--job-name {args.job_name!r}: use letters, digits, '.', '_' and '-'")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, command = split_command(argv)
        args = parse_args(flags)
        require_command(command, USAGE)
        document = script(args, command, parse_env(args.env))
        if args.dry_run:
            sys.stdout.write(document)
            return 0
        return submit([require_tool("sbatch")], document)
    except UsageError as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
