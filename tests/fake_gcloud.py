"""A stand-in for `gcloud` in tests/test_launch_tpu.py: TPU pods whose workers are local processes.

The test puts a `gcloud` script that runs this file first on PATH and sets FAKE_GCLOUD_ROOT, the folder holding
the fake's state (state.json), a record of every call (calls.jsonl) and of every pip install (pip.jsonl), the
gs:// buckets (gs/) and one home folder per worker (workers/NODE/I/, with its own tmp/). It emulates:

- `[alpha] compute tpus queued-resources create|describe|delete`: describe answers WAITING_FOR_RESOURCES,
  then PROVISIONING, then ACTIVE; a multislice request (--node-count, --node-prefix) has nodes PREFIX-0, ...
- `compute tpus tpu-vm ssh NODE --worker=all|I --command=C`: runs `bash -c C` in each selected worker's home,
  one process (session) per worker, with the environment of a TPU VM worker whose chips are 4 CPU devices:
  jax's cluster auto-detection finds the job (Open MPI's variables: rank = slice * hosts + worker) and its
  coordinator on 127.0.0.1 (JAX_COORDINATOR_ADDRESS, a port chosen at create). Like ssh, it exits with the
  command's status (the first failure among the workers), and ending it does not end the remote command.
- `compute tpus tpu-vm scp` between this machine and worker homes; `storage cp` with gs:// in gs/.
- On the workers' PATH: `uv venv DIR` makes a venv whose python is this interpreter and whose pip only
  records its arguments (pip.jsonl); python3 is this interpreter.

Failures to inject, in the environment: FAKE_GCLOUD_KILL=K:S kills job worker K's run (the command with
VLM_JAX_AUTO_DISTRIBUTED) S seconds after it starts (SIGKILL to its process group, as a crashed host);
FAKE_GCLOUD_UNREACHABLE=K makes worker K's run never start (its ssh waits until it is ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.environ.get("FAKE_GCLOUD_ROOT", "")
HOSTS = {"v5p-8": 1, "v5p-16": 2, "v4-8": 1, "v4-16": 2, "v5litepod-8": 1, "v6e-8": 1, "v6e-16": 4}
DEVICES_PER_WORKER = 4
STATES = ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
LEAKED = ("VLM_JAX_COORDINATOR", "VLM_JAX_NUM_PROCESSES", "VLM_JAX_PROCESS_ID", "XLA_FLAGS")


def fail(message: str, code: int = 1) -> int:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    return code


def split(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and --flag[=value] flags (bare flags map to "")."""
    positional, flags = [], {}
    for arg in args:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            flags[key] = value
        else:
            positional.append(arg)
    return positional, flags


def load() -> dict:
    path = os.path.join(ROOT, "state.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save(state: dict) -> None:
    with open(os.path.join(ROOT, "state.json.tmp"), "w") as f:
        json.dump(state, f, indent=1)
    os.replace(os.path.join(ROOT, "state.json.tmp"), os.path.join(ROOT, "state.json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_script(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{body}\n")
    os.chmod(path, 0o755)


def make_shims() -> None:
    shims = os.path.join(ROOT, "shims")
    os.makedirs(shims, exist_ok=True)
    write_script(os.path.join(shims, "python3"), f'exec {sys.executable} "$@"')
    write_script(os.path.join(shims, "uv"), f'exec {sys.executable} {os.path.abspath(__file__)} --shim-uv "$@"')


def create(name: str, flags: dict[str, str]) -> int:
    state = load()
    if name in state:
        return fail(f"ALREADY_EXISTS: queued resource {name}")
    if flags.get("accelerator-type") not in HOSTS:
        return fail(f"INVALID_ARGUMENT: accelerator type {flags.get('accelerator-type')!r}")
    nodes = ([flags["node-id"]] if "node-id" in flags
             else [f"{flags['node-prefix']}-{i}" for i in range(int(flags["node-count"]))])
    hosts = HOSTS[flags["accelerator-type"]]
    for node in nodes:
        for i in range(hosts):
            os.makedirs(os.path.join(ROOT, "workers", node, str(i), "tmp"), exist_ok=True)
    make_shims()
    state[name] = dict(nodes=nodes, hosts=hosts, describes=0, port=free_port(), flags=flags)
    save(state)
    print(f"Create request issued for: [{name}]", file=sys.stderr)
    return 0


def queued_resources(verb: str, args: list[str]) -> int:
    positional, flags = split(args)
    name = positional[0]
    if verb == "create":
        return create(name, flags)
    state = load()
    if name not in state:
        return fail(f"NOT_FOUND: queued resource {name}")
    if verb == "describe":
        state[name]["describes"] += 1
        save(state)
        print(STATES[min(state[name]["describes"], len(STATES)) - 1])
        return 0
    if verb == "delete":
        del state[name]
        save(state)
        return 0
    return fail(f"unknown queued-resources command {verb}", 2)


def find(node: str) -> tuple[dict, int] | None:
    """The queued resource holding `node`, and the node's slice index."""
    for resource in load().values():
        if node in resource["nodes"]:
            return resource, resource["nodes"].index(node)
    return None


def home(node: str, worker: int) -> str:
    return os.path.join(ROOT, "workers", node, str(worker))


def worker_env(resource: dict, slice_index: int, worker: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(LEAKED)}
    rank = slice_index * resource["hosts"] + worker
    port = resource["port"]
    env.update(HOME=home(resource["nodes"][slice_index], worker),
               TMPDIR=os.path.join(home(resource["nodes"][slice_index], worker), "tmp"),
               PATH=f"{os.path.join(ROOT, 'shims')}:{env.get('PATH', '')}", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_WORKER}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OMPI_MCA_orte_hnp_uri=f"4096.0;tcp://127.0.0.1:{port}",
               OMPI_COMM_WORLD_SIZE=str(resource["hosts"] * len(resource["nodes"])),
               OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK="0")
    return env


def injected(variable: str, rank: int, command: str) -> float | None:
    """The injection's number of seconds ("" -> 0) when it targets this worker's run, else None."""
    value = os.environ.get(variable)
    if not value or "VLM_JAX_AUTO_DISTRIBUTED" not in command:
        return None
    target, _, seconds = value.partition(":")
    return float(seconds or 0) if int(target) == rank else None


def crash(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_on_worker(resource: dict, slice_index: int, worker: int, command: str, codes: list[int]) -> None:
    env = worker_env(resource, slice_index, worker)
    rank = int(env["OMPI_COMM_WORLD_RANK"])
    if injected("FAKE_GCLOUD_UNREACHABLE", rank, command) is not None:
        time.sleep(3600)
    process = subprocess.Popen(["bash", "-c", command], cwd=env["HOME"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    kill_after = injected("FAKE_GCLOUD_KILL", rank, command)
    timer = threading.Timer(kill_after or 0, crash, (process.pid,))
    if kill_after is not None:
        timer.start()
    for line in process.stdout:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
    code = process.wait()
    timer.cancel()
    codes.append(128 - code if code < 0 else code)


def ssh(args: list[str]) -> int:
    positional, flags = split(args)
    found = find(positional[0])
    if found is None:
        return fail(f"NOT_FOUND: TPU {positional[0]}")
    resource, slice_index = found
    workers = range(resource["hosts"]) if flags["worker"] == "all" else [int(flags["worker"])]
    codes: list[int] = []
    threads = [threading.Thread(target=run_on_worker, args=(resource, slice_index, w, flags["command"], codes))
               for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return next((code for code in codes if code), 0)


def local_path(path: str) -> tuple[str | None, str]:
    """(node, path) for NODE:PATH, (None, path) for a local path."""
    node, sep, rest = path.partition(":")
    return (node, rest) if sep and "/" not in node else (None, path)


def scp(args: list[str]) -> int:
    (source, destination), flags = split(args)
    (source_node, source_path), (destination_node, destination_path) = local_path(source), local_path(destination)
    node = source_node or destination_node
    found = find(node)
    if found is None:
        return fail(f"NOT_FOUND: TPU {node}")
    workers = range(found[0]["hosts"]) if flags.get("worker", "0") == "all" else [int(flags.get("worker", "0"))]
    for worker in workers:
        if destination_node:
            shutil.copy(source_path, os.path.join(home(node, worker), destination_path))
        else:
            remote = os.path.join(home(node, worker), source_path)
            if not os.path.exists(remote):
                return fail(f"scp: {source_path}: No such file or directory")
            shutil.copy(remote, destination_path)
    return 0


def bucket_path(path: str) -> str:
    return os.path.join(ROOT, "gs", path[len("gs://"):]) if path.startswith("gs://") else path


def storage_cp(args: list[str]) -> int:
    (source, destination), _ = split(args)
    if not os.path.exists(bucket_path(source)):
        return fail(f"URL {source} does not exist")
    os.makedirs(os.path.dirname(os.path.abspath(bucket_path(destination))), exist_ok=True)
    shutil.copy(bucket_path(source), bucket_path(destination))
    return 0


def shim_uv(args: list[str]) -> int:
    """`uv venv [...] DIR`: a venv whose python is this interpreter and whose pip records its arguments."""
    positional, _ = split(args)
    if positional[:1] != ["venv"]:
        return fail(f"the fake uv knows only `venv`, not {args}", 2)
    bin_dir = os.path.join(positional[-1], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for name in ("python", "python3"):
        write_script(os.path.join(bin_dir, name), f'exec {sys.executable} "$@"')
    write_script(os.path.join(bin_dir, "pip"), f'exec {sys.executable} {os.path.abspath(__file__)} --shim-pip "$@"')
    return 0


def shim_pip(args: list[str]) -> int:
    with open(os.path.join(ROOT, "pip.jsonl"), "a") as f:
        f.write(json.dumps({"home": os.environ["HOME"], "cwd": os.getcwd(), "args": args}) + "\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--shim-uv"]:
        return shim_uv(argv[1:])
    if argv[:1] == ["--shim-pip"]:
        return shim_pip(argv[1:])
    with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    args = argv[1:] if argv[:1] in (["alpha"], ["beta"]) else argv
    if args[:3] == ["compute", "tpus", "queued-resources"] and len(args) > 4:
        return queued_resources(args[3], args[4:])
    if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        return ssh(args[4:])
    if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        return scp(args[4:])
    if args[:2] == ["storage", "cp"]:
        return storage_cp(args[2:])
    return fail(f"the fake gcloud does not know {' '.join(argv)!r}", 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
