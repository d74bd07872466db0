"""Ahead-of-time compile of the train step for a target topology (`python -m vlm_jax.bench compile`).

With jax's TPU support installed (libtpu), the step is compiled for the named topology's real devices
(`jax.experimental.topologies`). Without it, the same number of devices is simulated on CPU in a child process
(said in the output as "simulated": layouts and per-device bytes are those of the sharded program, but
temporary-buffer sizes come from XLA:CPU's scheduler, not the TPU compiler).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    cores_per_chip: int  # TPU names count TensorCores for v4 / v5p, chips for v5e / v6e
    hbm_bytes: int
    topology_prefix: str


CHIPS = {
    "v4": Chip(2, 32 * GIB, "v4"),
    "v5p": Chip(2, 95 * GIB, "v5p"),
    "v5e": Chip(1, 16 * GIB, "v5e"),
    "v6e": Chip(1, 32 * GIB, "v6e"),
}


def parse_topology(name: str) -> tuple[str, int]:
    """'v5p-256' -> ('v5p', 128 chips)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if not match:
        raise ValueError(f"unknown topology {name!r}; use e.g. v5p-256, v4-64, v5e-16, v6e-256")
    generation, size = match.group(1), int(match.group(2))
    chips = size // CHIPS[generation].cores_per_chip
    if chips < 1 or size % CHIPS[generation].cores_per_chip:
        raise ValueError(f"topology {name!r} does not name whole chips")
    return generation, chips


def tpu_devices(generation: str, chips: int):
    """The abstract devices of a TPU topology, or None when jax has no TPU support here."""
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(f"{generation}-{chips * CHIPS[generation].cores_per_chip}",
                                            "tpu").devices
    except (RuntimeError, ValueError):
        return None


def leaf_bytes_per_device(abstract_tree, shardings) -> int:
    import jax
    from vlm_jax.parallel.sharding import shard_factor
    return sum(leaf.size * leaf.dtype.itemsize // shard_factor(sharding) for leaf, sharding in
               zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def compile_report(config, devices) -> dict:
    """Per-device bytes of parameters, optimizer state and temporaries of the compiled train step."""
    import jax
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.parallel.sharding import batch_sharding
    from vlm_jax.tasks import get_task
    from vlm_jax.train_state import make_state_layout
    from vlm_jax.train_step import make_train_step

    mesh = make_mesh(config.mesh, devices)
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = get_task(config, mesh)
    layout = make_state_layout(task, config, mesh)
    step = make_train_step(task, layout, sharding, config.microbatches)
    image, length = config.model.image.image_size, config.model.text.max_len
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, image, image, 3), jax.numpy.uint8, sharding=sharding),
             "text": jax.ShapeDtypeStruct((config.batch_size, length), jax.numpy.int32, sharding=sharding)}
    memory = step.lower(layout.abstract_state, batch).compile().memory_analysis()
    return {
        "devices": len(devices), "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params_bytes_per_device": leaf_bytes_per_device(layout.abstract_state["params"], layout.shardings["params"]),
        "opt_state_bytes_per_device": leaf_bytes_per_device(layout.abstract_state["opt_state"],
                                                            layout.shardings["opt_state"]),
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "aliased_bytes_per_device": memory.alias_size_in_bytes,
    }


def bench_compile(config_spec: str, overrides: list[str], topology: str) -> dict:
    """The report for `topology`; simulates its device count on CPU in a child process if needed."""
    from vlm_jax.config import load_config
    generation, chips = parse_topology(topology)
    chip = CHIPS[generation]
    config = load_config(config_spec, overrides)
    devices = tpu_devices(generation, chips)
    if devices is not None:
        report = {**compile_report(config, devices), "compiled_for": "tpu"}
    else:
        report = simulate(config_spec, overrides, chips)
    peak = (report["argument_bytes_per_device"] + report["output_bytes_per_device"]
            - report["aliased_bytes_per_device"] + report["temp_bytes_per_device"])
    return {"bench": "compile", "topology": topology, "chips": chips, **report,
            "peak_bytes_per_device": peak, "hbm_bytes_per_chip": chip.hbm_bytes, "fits": peak <= chip.hbm_bytes}


def simulate(config_spec: str, overrides: list[str], devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "vlm_jax.bench_compile", config_spec, *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"simulated compile failed: {result.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]),
            "compiled_for": f"cpu (simulated {devices} devices: no TPU support in this jax install)"}


if __name__ == "__main__":  # the child process of `simulate`
    import jax
    from vlm_jax.config import load_config
    print(json.dumps(compile_report(load_config(sys.argv[1], sys.argv[2:]), jax.devices())))
