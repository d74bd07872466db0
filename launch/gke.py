"""Runs a training command on GKE as a JobSet: TPU slices (one replicated job per slice) or GPU nodes.

    python -m launch.gke --name clip-b16 --image IMAGE --tpu v5p-256 [--slices 2] [--dry-run] -- \
        python -m vlm_jax.train --config=configs/paper/clip_b16.py --workdir=gs://BUCKET/clip-b16
    python -m launch.gke --name clip-b16 --image IMAGE --gpu h100-80gb --nodes 2 [--gpus-per-node 8] -- ...

The JobSet (YAML, written with PyYAML, which ml_collections and flax already require) goes to `kubectl apply -f -`,
or to standard output under --dry-run. Every pod runs COMMAND under a small bash wrapper that forwards SIGTERM (the
preemption notice) to it and exits with its status. A trainer exit of 42 (saved after SIGTERM) or 128-255 (killed
by a signal) restarts the whole JobSet, up to --max-restarts times; any other failure fails it at once (xpk's
podFailurePolicy + failurePolicy convention). Kubernetes expands $(VAR) in COMMAND from the container's environment.

TPU: node selectors cloud.google.com/gke-tpu-accelerator / gke-tpu-topology, google.com/tpu chips per host (4, or
1 for a one-chip slice: so v5e-8 / v6e-8 mean two 4-chip hosts, as in xpk), hostNetwork, and each slice on its own
node pool (JobSet's exclusive-topology annotation). VLM_JAX_AUTO_DISTRIBUTED=1: jax.distributed finds the workers
from TPU_WORKER_HOSTNAMES / TPU_WORKER_ID and, with several slices, MEGASCALE_*, which GKE sets in TPU JobSet pods
(xpk sets none of them itself).
GPU: nvidia.com/gpu per node, the cloud.google.com/gke-accelerator node selector, and an explicit coordinator: the
first pod's stable hostname NAME-workers-0-0.NAME (JobSet's headless service) as VLM_JAX_COORDINATOR, the pod's
completion index as VLM_JAX_PROCESS_ID. GPUDirect-TCPX/TCPXO/RDMA networking sidecars are not added.
"""

from __future__ import annotations

import argparse
import re
import sys

import yaml

from launch.cluster_cli import (RESTART_EXIT_CODES, UsageError, fail, parse_env, require_command, require_tool,
                                split_command, submit)
from vlm_jax.parallel.topology import TopologyError, parse_topology

USAGE = ("python -m launch.gke --name NAME --image IMAGE (--tpu TYPE [--slices N] | --gpu TYPE --nodes N) "
         "[--dry-run] -- COMMAND...")
CONTAINER = "train"
TPU_LABELS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice",
              "v6e": "tpu-v6e-slice"}  # cloud.google.com/gke-tpu-accelerator values
# name -> cloud.google.com/gke-accelerator value; each type's largest machine has 8 GPUs
GPU_TYPES = {"h100-80gb": "nvidia-h100-80gb", "h100-mega-80gb": "nvidia-h100-mega-80gb",
             "h200-141gb": "nvidia-h200-141gb", "b200": "nvidia-b200", "a100-80gb": "nvidia-a100-80gb",
             "a100-40gb": "nvidia-tesla-a100", "l4": "nvidia-l4"}
MAX_GPUS_PER_NODE = 8
GPU_COORDINATOR_PORT = 6002
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

# Runs "$@" in the background, forwards SIGTERM to it, and exits with its status. A wait cut short by the trap
# returns 143 whether or not the trainer has ended, so wait again after every trap; a wait for a status already
# collected answers 127 and keeps the one before. No $(...): Kubernetes would try to expand it.
WRAPPER = """\
trap 'interrupted=1; echo "launch.gke: SIGTERM forwarded to the trainer" >&2; kill -TERM "$child" 2>/dev/null' TERM
"$@" &
child=$!
status=127
while :; do
  interrupted=
  wait "$child"
  code=$?
  [ "$code" -ne 127 ] && status=$code
  [ -z "$interrupted" ] && break
done
exit "$status"
"""


def container(image: str, command: list[str], env: dict[str, object], limits: dict[str, int],
              ports: list[int]) -> dict:
    """The training container: COMMAND under the SIGTERM-forwarding wrapper; env values are strings or fieldRefs."""
    return {
        "name": CONTAINER, "image": image,
        "command": ["bash", "-c", WRAPPER, "launch.gke"], "args": command,
        "env": [{"name": key, "value": value} if isinstance(value, str) else {"name": key, "valueFrom": value}
                for key, value in env.items()],
        "ports": [{"containerPort": port} for port in ports],
        "resources": {"limits": limits},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],  # shared memory for data workers, NCCL
    }


def pod_spec(args: argparse.Namespace, node_selector: dict[str, str], main: dict, **extra) -> dict:
    spec = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": args.grace_s, "nodeSelector": node_selector, **extra}
    if args.service_account:
        spec["serviceAccountName"] = args.service_account
    return spec | {"containers": [main], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}


def jobset(args: argparse.Namespace, replicated_job: str, replicas: int, pods: int, pod: dict,
           annotations: dict[str, str]) -> dict:
    """A JobSet of `replicas` indexed jobs of `pods` pods each; restarts as the module docstring says."""
    metadata: dict = {"name": args.name}
    if args.namespace:
        metadata["namespace"] = args.namespace
    if args.queue:
        metadata["labels"] = {"kueue.x-k8s.io/queue-name": args.queue}
    if annotations:
        metadata["annotations"] = annotations
    job = {"parallelism": pods, "completions": pods, "completionMode": "Indexed", "backoffLimit": 0,
           "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
               "containerName": CONTAINER, "operator": "NotIn", "values": list(RESTART_EXIT_CODES)}}]},
           "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
        "spec": {"failurePolicy": {"maxRestarts": args.max_restarts,
                                   "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]},
                 "network": {"enableDNSHostnames": True},
                 "replicatedJobs": [{"name": replicated_job, "replicas": replicas,
                                     "template": {"spec": job}}]},
    }


def tpu_jobset(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> dict:
    topology = parse_topology(args.tpu)
    chips_per_host = 1 if topology.chips == 1 else 4
    hosts, slices = topology.chips // chips_per_host, 1 if args.slices is None else args.slices
    check_hostnames(args.name, "slice", slices, hosts)
    selector = {"cloud.google.com/gke-tpu-accelerator": TPU_LABELS[topology.generation],
                "cloud.google.com/gke-tpu-topology": topology.shape}
    main = container(args.image, command, {"VLM_JAX_AUTO_DISTRIBUTED": "1"} | env,
                     {"google.com/tpu": chips_per_host}, [8471, 8080])
    return jobset(args, "slice", slices, hosts, pod_spec(args, selector, main),
                  {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"})


def gpu_jobset(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> dict:
    if args.gpu not in GPU_TYPES:
        raise UsageError(f"unknown GPU type {args.gpu!r}; known: {', '.join(GPU_TYPES)}")
    gpus = MAX_GPUS_PER_NODE if args.gpus_per_node is None else args.gpus_per_node
    nodes = 1 if args.nodes is None else args.nodes
    if not 1 <= gpus <= MAX_GPUS_PER_NODE:
        raise UsageError(f"--gpus-per-node {gpus}: a node has 1 to {MAX_GPUS_PER_NODE}")
    check_hostnames(args.name, "workers", 1, nodes)
    distributed = {
        "VLM_JAX_COORDINATOR": f"{args.name}-workers-0-0.{args.name}:{GPU_COORDINATOR_PORT}",
        "VLM_JAX_NUM_PROCESSES": str(nodes),
        "VLM_JAX_PROCESS_ID": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    main = container(args.image, command, distributed | env, {"nvidia.com/gpu": gpus},
                     [GPU_COORDINATOR_PORT, GPU_COORDINATOR_PORT + 1])  # + 1: vlm_jax's roll call
    pod = pod_spec(args, {"cloud.google.com/gke-accelerator": GPU_TYPES[args.gpu]}, main,
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    return jobset(args, "workers", 1, nodes, pod, {})


def check_hostnames(name: str, replicated_job: str, replicas: int, pods: int) -> None:
    """Pod hostnames NAME-JOB-i-j are DNS labels (lower-case letters, digits, '-'; at most 63 characters)."""
    last = f"{name}-{replicated_job}-{replicas - 1}-{pods - 1}"
    if not DNS_LABEL.fullmatch(name) or len(last) > 63:
        raise UsageError(f"--name {name!r} must be lower-case letters, digits and '-', starting with a letter, "
                         f"short enough that pod hostnames such as {last!r} stay within 63 characters")


class _Dumper(yaml.SafeDumper):
    """Block literals for multi-line strings, one-line lists of integers."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", items, flow_style=bool(items) and all(isinstance(i, int) for i in items)))


def to_yaml(document: dict) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def parse_args(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.gke", usage=USAGE, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="JobSet name (a DNS label)")
    parser.add_argument("--image", required=True, help="container image holding the checkout and its environment")
    accelerator = parser.add_mutually_exclusive_group(required=True)
    accelerator.add_argument("--tpu", help="slice type, e.g. v5p-256, v6e-256 (or v5p:4x4x8)")
    accelerator.add_argument("--gpu", help=f"GPU type: {', '.join(GPU_TYPES)}")
    parser.add_argument("--slices", type=int, default=None, help="TPU slices (multislice over DCN when > 1)")
    parser.add_argument("--nodes", type=int, default=None, help="GPU nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default 8")
    parser.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts on exit 42 or a signal")
    parser.add_argument("--grace-s", type=int, default=300, help="terminationGracePeriodSeconds (time to save)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--queue", default=None, help="Kueue LocalQueue (kueue.x-k8s.io/queue-name label)")
    parser.add_argument("--service-account", default=None, help="e.g. one with Workload Identity for gs://")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment")
    parser.add_argument("--dry-run", action="store_true", help="print the JobSet YAML instead of applying it")
    args = parser.parse_args(flags)
    if args.tpu and (args.nodes, args.gpus_per_node) != (None, None) or args.gpu and args.slices is not None:
        raise UsageError("--slices goes with --tpu; --nodes and --gpus-per-node go with --gpu")
    if min(1 if n is None else n for n in (args.slices, args.nodes)) < 1 or args.max_restarts < 0:
        raise UsageError("--slices and --nodes must be at least 1, --max-restarts at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, command = split_command(argv)
        args = parse_args(flags)
        require_command(command, USAGE)
        env = parse_env(args.env)
        document = to_yaml(tpu_jobset(args, command, env) if args.tpu else gpu_jobset(args, command, env))
        if args.dry_run:
            sys.stdout.write(document)
            return 0
        return submit([require_tool("kubectl"), "apply", "-f", "-"], document)
    except (UsageError, TopologyError) as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
