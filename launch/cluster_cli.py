"""What the cluster launchers (launch.gke, launch.slurm, launch.sweep) share: the `-- COMMAND` split, KEY=VALUE
environment flags, one-line errors, the exit codes a job restarts on, and handing a document to a scheduler's CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys

# A job restarts (JobSet restart, SLURM requeue) when its trainer exits with one of these: 42, what the trainer
# returns after saving on SIGTERM, and 128 + N, a death by signal N (a SIGKILL after the grace period, an OOM
# kill). xpk's set less 127 (command not found, which a restart does not mend). Anything else (1: a crash,
# 2: bad input) fails the job at once.
SAVED_EXIT_CODE = 42
SIGNAL_EXIT_CODES = range(128, 256)
RESTART_EXIT_CODES = (SAVED_EXIT_CODE, *SIGNAL_EXIT_CODES)


class UsageError(ValueError):
    """Bad command-line input; main() prints it as one `error:` line and exits 2."""


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, COMMAND) around the first `--` (COMMAND is empty without one)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def require_command(command: list[str], usage: str) -> None:
    if not command:
        raise UsageError(f"no command to run; usage: {usage}")


def parse_env(items: list[str]) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}, in order."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def require_tool(tool: str) -> str:
    """The tool's path on PATH, or a UsageError saying it is missing."""
    path = shutil.which(tool)
    if path is None:
        raise UsageError(f"{tool} is not on PATH (install it, or use --dry-run to print what would be submitted)")
    return path


def submit(command: list[str], document: str) -> int:
    """Runs `command` with `document` on its standard input; its output passes through; returns its status."""
    return subprocess.run(command, input=document, text=True).returncode


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
