"""The gcloud commands of launch/tpu.py, as argument lists: pure functions of the pod's settings, so that
`--dry-run` prints exactly what a real run executes.

A pod is one queued resource of `node_count` slices (TPU VMs named NAME, or NAME-0 .. NAME-{n-1} for
multislice) of one accelerator type; each slice has `hosts` workers. Worker k of the job (jax's process index)
is worker k % hosts of slice k // hosts.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

from vlm_jax.parallel.topology import TopologyError, known_names, parse_topology

RUNTIME_VERSIONS = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite",
                    "v4": "tpu-ubuntu2204-base"}
PROVISIONING = ("spot", "reserved", "best-effort")   # best-effort exists only in `gcloud alpha`
REMOTE_DIR = "vlm_jax_pod"                           # under each worker's home: src/, venv/, run.pid, run.log
TARBALL = "vlm_jax_checkout.tar.gz"                  # the shipped checkout, in each worker's home
WORKER = "python3 -m launch.tpu_worker"              # run from REMOTE_DIR/src


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    accelerator_type: str       # as gcloud names it: v5p-256, v6e-256, v4-16, v5litepod-8
    runtime_version: str
    hosts: int                  # workers per slice
    node_count: int = 1
    zone: str | None = None
    project: str | None = None

    @property
    def nodes(self) -> list[str]:
        return [self.name] if self.node_count == 1 else [f"{self.name}-{i}" for i in range(self.node_count)]

    @property
    def workers(self) -> int:
        return self.hosts * self.node_count

    def where(self, k: int) -> tuple[str, int]:
        """(TPU VM name, worker index in it) of job worker k."""
        return self.nodes[k // self.hosts], k % self.hosts

    def describe(self, k: int) -> str:
        node, index = self.where(k)
        return f"worker {k} ({node}, worker {index})"


def make_pod(name: str, accelerator_type: str, node_count: int = 1, zone: str | None = None,
             project: str | None = None, runtime_version: str | None = None) -> Pod:
    """Reads v5p-256, v6e-256, v5e-8 / v5litepod-8, v4-16 or libtpu's GEN:AxB[xC]; TopologyError otherwise."""
    name_units = re.fullmatch(r"v5litepod-(\d+)", accelerator_type)
    try:
        topology = parse_topology(f"v5e-{name_units.group(1)}" if name_units else accelerator_type)
    except TopologyError:
        raise TopologyError(f"unknown accelerator type {accelerator_type!r}; known: {', '.join(known_names())} "
                            "(v5e-N is gcloud's v5litepod-N; libtpu's GEN:AxB[xC] also works)") from None
    size = topology.chips * topology.chip.cores_per_name_unit
    gcloud_type = f"v5litepod-{size}" if topology.generation == "v5e" else f"{topology.generation}-{size}"
    single_host = topology.chips <= 8 if topology.chip.dims == 2 else topology.chips <= 4
    return Pod(name, gcloud_type, runtime_version or RUNTIME_VERSIONS[topology.generation],
               1 if single_host else topology.chips // 4, node_count, zone, project)


def location(pod: Pod) -> list[str]:
    return ([f"--zone={pod.zone}"] if pod.zone else []) + ([f"--project={pod.project}"] if pod.project else [])


def create(pod: Pod, provisioning: str | None) -> list[str]:
    track = ["alpha"] if provisioning == "best-effort" else []
    nodes = ([f"--node-id={pod.name}"] if pod.node_count == 1
             else [f"--node-count={pod.node_count}", f"--node-prefix={pod.name}"])
    return ["gcloud", *track, "compute", "tpus", "queued-resources", "create", pod.name, *location(pod),
            f"--accelerator-type={pod.accelerator_type}", f"--runtime-version={pod.runtime_version}", *nodes,
            *([f"--{provisioning}"] if provisioning else [])]


def describe(pod: Pod) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", pod.name, *location(pod),
            "--format=value(state.state)"]


def delete(pod: Pod) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", pod.name, *location(pod), "--force",
            "--quiet"]


def ssh(pod: Pod, node: str, worker: int | str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *location(pod), f"--worker={worker}",
            f"--command={command}"]


def scp(pod: Pod, source: str, destination: str, worker: int | str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", source, destination, *location(pod),
            f"--worker={worker}"]


def stage_url(stage: str, pod: Pod) -> str:
    return f"{stage.rstrip('/')}/{pod.name}/checkout.tar.gz"


def setup_script(stage_from: str | None, python: str) -> str:
    """Unpacks the checkout into REMOTE_DIR/src and (re)builds the venv when setup.py or `python` changed."""
    fetch = f"gcloud storage cp {stage_from} {TARBALL} && " if stage_from else ""
    return (f"set -e; {fetch}mkdir -p {REMOTE_DIR} && cd {REMOTE_DIR} && "
            f"rm -rf src && mkdir src && tar -xzf ../{TARBALL} -C src && "
            f'stamp="$(sha256sum src/setup.py | cut -c1-64) python{python}" && '
            'if [ "$(cat venv/stamp 2>/dev/null)" != "$stamp" ]; then '
            "export PATH=$HOME/.local/bin:$PATH && "
            "(command -v uv >/dev/null || python3 -m pip install --user --quiet uv) && "
            f"rm -rf venv && uv venv --quiet --seed --python {python} venv && "
            '(cd src && ../venv/bin/pip install --quiet -e ".[tpu]") && '
            'echo "$stamp" > venv/stamp; fi')


def ship(pod: Pod, tarball: str, stage: str | None, python: str) -> tuple[list[list[str]], list[list[str]]]:
    """The commands that copy the checkout tarball to every worker (through `stage`, a gs:// folder, when
    given), then the ones that unpack it and set up the venv there."""
    if stage:
        copies = [["gcloud", "storage", "cp", tarball, stage_url(stage, pod)]]
    else:
        copies = [scp(pod, tarball, f"{node}:{TARBALL}", "all") for node in pod.nodes]
    script = setup_script(stage_url(stage, pod) if stage else None, python)
    return copies, [ssh(pod, node, "all", script) for node in pod.nodes]


def start_script(command: list[str], env: dict[str, str], grace_s: float) -> str:
    """What every worker runs: the worker wrapper around the command, with automatic jax.distributed."""
    variables = " ".join(f"{key}={shlex.quote(value)}" for key, value in
                         {"VLM_JAX_AUTO_DISTRIBUTED": "1", **env}.items())
    return (f"cd {REMOTE_DIR}/src && exec env {variables} {WORKER} start --grace-s={grace_s:g} -- "
            f"{shlex.join(command)}")


def start(pod: Pod, k: int, script: str) -> list[str]:
    node, index = pod.where(k)
    return ssh(pod, node, index, script)


def stop(pod: Pod, grace_s: float) -> list[list[str]]:
    script = f"cd {REMOTE_DIR}/src 2>/dev/null && {WORKER} stop --grace-s={grace_s:g} || true"
    return [ssh(pod, node, "all", script) for node in pod.nodes]


def fetch_log(pod: Pod, k: int, destination: str) -> list[str]:
    node, index = pod.where(k)
    return scp(pod, f"{node}:{REMOTE_DIR}/run.log", destination, index)
