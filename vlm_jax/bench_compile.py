"""Ahead-of-time compile of the train step for a TPU topology (`python -m vlm_jax.bench compile`).

With jax's TPU support installed (the `tpu` extra: libtpu), the step is compiled by the real TPU compiler
for the named topology's devices (`parallel/topology.py`), Mosaic kernels included, from any host. The report
gives the compiler's per-device HBM figures, its FLOP and byte counts next to the analytic model FLOPs, and a
roofline lower bound on the step time from the chip's published peaks (compute or HBM traffic, whichever is
slower; inter-chip communication is not modelled). The HBM traffic is read from the compiled program
(`hbm_traffic.py`: buffers the compiler placed in HBM, each HBM <-> VMEM copy once); the compiler's own "bytes
accessed", which also counts on-chip VMEM and each copy at both ends, gives a second, looser ceiling. Without
libtpu, the same device count is simulated on CPU in a child process and the output says so: shardings and
per-device argument bytes are those of the sharded program, but temporaries and costs come from XLA:CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from vlm_jax.hbm_traffic import hbm_traffic_bytes
from vlm_jax.parallel.topology import GIB, Topology, parse_topology, tpu_devices


def lower_train_step(config, devices):
    """(task, layout, mesh, jax.stages.Lowered) of the train step of `config` on a mesh over `devices`; the
    kernels and `auto` attention follow the devices' platform."""
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
    return task, layout, mesh, step.lower(layout.abstract_state, task.abstract_batch(config.batch_size, sharding))


def leaf_bytes_per_device(abstract_tree, shardings) -> int:
    import jax
    from vlm_jax.parallel.sharding import shard_factor
    return sum(leaf.size * leaf.dtype.itemsize // shard_factor(sharding) for leaf, sharding in
               zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def compile_report(config, devices) -> dict:
    """Per-device bytes, the compiler's FLOPs and bytes accessed, and the model FLOPs of the train step. When
    the TPU compiler refuses the step for lack of HBM, the bytes it asked for instead (see `_out_of_memory`)."""
    import jax
    task, layout, mesh, lowered = lower_train_step(config, devices)
    state_bytes = {
        "params_bytes_per_device": leaf_bytes_per_device(layout.abstract_state["params"], layout.shardings["params"]),
        "opt_state_bytes_per_device": leaf_bytes_per_device(layout.abstract_state["opt_state"],
                                                            layout.shardings["opt_state"]),
    }
    report = {"devices": len(devices), "mesh": {k: int(v) for k, v in mesh.shape.items()}, **state_bytes,
              "model_flops_per_device": task.train_flops_per_sample() * config.batch_size / len(devices)}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        refusal = _out_of_memory(str(e))
        if refusal is None:
            raise
        return {**report, **refusal, "argument_bytes_per_device": sum(state_bytes.values()),
                "output_bytes_per_device": 0, "aliased_bytes_per_device": 0}
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        **report,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "aliased_bytes_per_device": memory.alias_size_in_bytes,
        "compiler_flops_per_device": float(cost.get("flops", 0.0)),
        "compiler_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "hbm_traffic_bytes_per_device": hbm_traffic_bytes(compiled.as_text())["hbm_bytes"],
    }


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(message: str) -> dict | None:
    """The TPU compiler's refusal of a program that exceeds HBM ("the total memory required for HLO
    temporaries (149.02G) exceeds available HBM (15.75G)"): its temporaries and its first line; else None."""
    if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
        return None
    match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    temp = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
    return {"temp_bytes_per_device": temp, "compiler_error": message.strip().splitlines()[0]}


def roofline(report: dict, topology: Topology) -> dict:
    """Lower bound on the step time from the chip's peaks (the compiler's FLOPs, the HBM traffic), and the MFU
    ceiling it implies; the same ceiling with the compiler's "bytes accessed" as the memory term (nothing for a
    step the compiler refused)."""
    if "compiler_flops_per_device" not in report:
        return {}
    chip, per_device = topology.chip, topology.chips / report["devices"]  # chips per device (v4: 1/2)
    peak_flops, bandwidth = chip.peak_bf16_flops * per_device, chip.hbm_bytes_per_s * per_device
    compute_s = report["compiler_flops_per_device"] / peak_flops
    memory_s = report["hbm_traffic_bytes_per_device"] / bandwidth
    bytes_accessed_s = report["compiler_bytes_accessed_per_device"] / bandwidth

    def ceiling(bound_s: float) -> float | None:
        return round(report["model_flops_per_device"] / (bound_s * peak_flops), 3) if bound_s else None

    bound_s = max(compute_s, memory_s)
    return {
        "compiler_vs_model_flops": round(report["compiler_flops_per_device"] / report["model_flops_per_device"], 3),
        "peak_flops_per_device": peak_flops, "hbm_bytes_per_s_per_device": bandwidth,
        "roofline_compute_s": round(compute_s, 6), "roofline_memory_s": round(memory_s, 6),
        "step_time_lower_bound_s": round(bound_s, 6), "bound_by": "compute" if compute_s >= memory_s else "memory",
        "mfu_ceiling": ceiling(bound_s),
        "roofline_bytes_accessed_s": round(bytes_accessed_s, 6),
        "mfu_ceiling_bytes_accessed": ceiling(max(compute_s, bytes_accessed_s)),
    }


def num_slices(config) -> int:
    from vlm_jax.parallel.mesh import dcn_shape
    return math.prod(dcn_shape(config.mesh))


def bench_compile(config_spec: str, overrides: list[str], topology_name: str) -> dict:
    """The report for `topology_name` (TopologyError for an unknown name); simulated on CPU without libtpu."""
    from vlm_jax.config import load_config
    topology = parse_topology(topology_name)
    config = load_config(config_spec, overrides)
    slices = num_slices(config)
    try:
        devices = tpu_devices(topology, slices)
    except RuntimeError as e:  # no TPU support in this jax install
        report = simulate(config_spec, overrides, topology.chips * slices, str(e))
    else:
        report = {**compile_report(config, devices), "compiled_for": f"tpu ({devices[0].device_kind})"}
    hbm_per_device = topology.chip.hbm_bytes * topology.chips * slices // report["devices"]
    peak = (report["argument_bytes_per_device"] + report["output_bytes_per_device"]
            - report["aliased_bytes_per_device"] + report["temp_bytes_per_device"])
    if config.model.scan:  # no roofline from figures that miss all layers but one
        report["cost_note"] = ("model.scan=True: XLA's cost analysis counts a scanned layer once, so its FLOPs "
                               "and bytes undercount and no roofline is given; memory figures are exact")
    bound = {} if config.model.scan else roofline(report, topology)
    return {"bench": "compile", "topology": topology_name, "libtpu_topology": topology.libtpu_name,
            "slices": slices, "chips": topology.chips * slices, **report, **bound,
            "peak_bytes_per_device": peak, "hbm_bytes_per_device": hbm_per_device,
            "fits": peak <= hbm_per_device and "compiler_error" not in report}


def does_not_fit(report: dict) -> str | None:
    """The one-line verdict for a step whose peak exceeds the chip's HBM (or that the compiler refused for
    lack of HBM without saying how much it needed), or None."""
    if report["fits"]:
        return None
    if report["peak_bytes_per_device"] <= report["hbm_bytes_per_device"]:
        return f"does not fit: {report['compiler_error']}"
    return (f"does not fit: peak {report['peak_bytes_per_device'] / GIB:.2f} GiB > "
            f"{report['hbm_bytes_per_device'] / GIB:.2f} GiB HBM per device")


def simulate(config_spec: str, overrides: list[str], devices: int, why: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "vlm_jax.bench_compile", config_spec, *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"simulated compile failed: {result.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]),
            "compiled_for": f"cpu (simulated {devices} devices; not the TPU compiler: {why})"}


if __name__ == "__main__":  # the child process of `simulate`
    import jax
    from vlm_jax.config import load_config
    print(json.dumps(compile_report(load_config(sys.argv[1], sys.argv[2:]), jax.devices())))
