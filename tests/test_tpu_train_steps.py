"""The train step of every shipped config compiled by the real TPU compiler for v5e, v5p and v6e, on the mesh
the config asks for; the fused kernel inside compiled steps; a data x fsdp x tensor mesh and a two-slice mesh.

Model, parameters, optimizer state and mesh are as shipped; the batch is one example per data-parallel device,
because the TPU compiler's time on this CPU grows with the batch (BENCH-S: 54 s at 4 examples, 289 s at 32 on
v5e), while what compiles does not depend on it. `bench compile` compiles the shipped batch.
"""

import glob
import os

import pytest

from vlm_jax.bench_compile import lower_train_step
from vlm_jax.config import load_config
from vlm_jax.parallel.mesh import resolve_mesh_shape
from vlm_jax.parallel.topology import parse_topology, tpu_devices

from tpu_targets import GENERATIONS, devices, mosaic_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIGS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(f"{ROOT}/configs/**/*.py", recursive=True)
                         if not os.path.basename(path).startswith("_"))
# Pod recipes (configs/paper/) are compiled for one generation, to keep the suite's time: their shapes, not the
# generation, are what they test.
PAPER_CONFIGS = [path for path in SHIPPED_CONFIGS if path.startswith("configs/paper/")]
PALIGEMMA = "configs/paper/paligemma_224.py"  # sharded for 128 chips: compiled for v5p-256 below
# The VLM demos' steps are the PaliGemma recipe's at a tiny size, and the data benchmark's is the base config's
# B/16 (BENCH-D times the input pipeline, not the step): one generation keeps the suite's time.
ONE_GENERATION = ("configs/demo/vlm_tiny.py", "configs/demo/lm_tiny.py", "configs/bench/data_256.py")
PRIOR = "configs/demo/vlm_tiny_prior.py"  # reads its reference LM's saved config: compiled below
DEMO = "configs/demo/clip_tiny.py"
DEMO_ATTENTION_LAYERS = 3 + 2  # image and text blocks of the demo model


def compile_step(config_path: str, target_devices, overrides=()):
    """The compiled train step of a config on `target_devices`, one example per data-parallel device."""
    config = load_config(os.path.join(ROOT, config_path), list(overrides))
    sizes = dict(zip(("data", "fsdp", "sequence", "tensor"), resolve_mesh_shape(config.mesh, len(target_devices))))
    config.batch_size = len(target_devices) // (sizes["sequence"] * sizes["tensor"])
    return lower_train_step(config, target_devices)[-1].compile()


def test_every_config_is_covered():
    assert {DEMO, "configs/demo/siglip_tiny.py", "configs/demo/cappa_tiny.py", "configs/demo/coca_tiny.py",
            "configs/demo/vlm_tiny.py", "configs/demo/lm_tiny.py", PRIOR, "configs/bench/siglip_s16.py",
            "configs/paper/cappa_b16.py", "configs/paper/coca_b32.py", PALIGEMMA} <= set(SHIPPED_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("config_path, generation", [
    (path, generation) for path in SHIPPED_CONFIGS if path not in PAPER_CONFIGS + [PRIOR]
    for generation in (("v5p",) if path in ONE_GENERATION else GENERATIONS)])
def test_shipped_config_step_compiles_for_tpu(config_path, generation):
    compiled = compile_step(config_path, devices(generation))
    assert compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("config_path", [path for path in PAPER_CONFIGS if path != PALIGEMMA])
def test_paper_recipe_step_compiles_for_tpu(config_path):
    compiled = compile_step(config_path, devices("v5p"))
    assert compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.slow
def test_prior_step_with_its_frozen_reference_lm_compiles_for_tpu(tmp_path):
    from vlm_jax.config import save_config
    save_config(load_config(os.path.join(ROOT, "configs/demo/lm_tiny.py")), tmp_path / "config.json")
    compiled = compile_step(f"{PRIOR}:demo_out/data,,{tmp_path}", devices("v5p"))  # the reference run: tmp_path
    assert compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.slow
def test_paligemma_recipe_step_compiles_for_v5p_256_with_the_prefix_lm_kernel():
    """So400m/14 + Gemma-2B in bfloat16 on 128 chips (data 16 x fsdp 8): the Pallas prefix-LM kernel in every
    attention (forward, dq, dk/dv per scanned stack), and the whole step within a v5p chip's 95 GiB of HBM."""
    compiled = compile_step(PALIGEMMA, tpu_devices(parse_topology("v5p-256")))
    assert mosaic_kernels(compiled) >= 6
    memory = compiled.memory_analysis()
    per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    assert per_device + memory.temp_size_in_bytes < 95 * 2**30


@pytest.mark.slow
@pytest.mark.parametrize("generation", GENERATIONS)
def test_compiled_step_holds_the_mosaic_kernel_where_pallas_is_chosen(generation):
    """The kernel platform follows the mesh's devices (TPU), not this host's backend (CPU): forward, dq and
    dk/dv Mosaic kernels for every attention layer."""
    compiled = compile_step(DEMO, devices(generation), ["model.attention_impl=pallas"])
    assert mosaic_kernels(compiled) == 3 * DEMO_ATTENTION_LAYERS
    assert mosaic_kernels(compile_step(DEMO, devices(generation))) == 0  # auto: short sequences go to XLA


@pytest.mark.slow
def test_data_fsdp_tensor_mesh_compiles_with_the_kernel():
    eight_chips = tpu_devices(parse_topology("v5e-8"))
    compiled = compile_step(DEMO, eight_chips, ["model.attention_impl=pallas", "mesh.data=2", "mesh.fsdp=2",
                                                "mesh.tensor=2"])
    assert mosaic_kernels(compiled) == 3 * DEMO_ATTENTION_LAYERS


@pytest.mark.slow
def test_two_slice_mesh_compiles_with_the_kernel():
    two_slices = devices("v5e", slices=2)
    assert {device.slice_index for device in two_slices} == {0, 1}
    compiled = compile_step(DEMO, two_slices, ["model.attention_impl=pallas", "mesh.dcn_data=2"])
    assert mosaic_kernels(compiled) == 3 * DEMO_ATTENTION_LAYERS


def test_mesh_axes_may_split_physical_axes():
    """data 32 x fsdp 8 on a 16 x 16 v6e-256: the fsdp axis takes half of a physical row."""
    from configs.bench.siglip_s16 import get_config
    from vlm_jax.parallel.mesh import make_mesh
    mesh_config = get_config().mesh
    mesh_config.data, mesh_config.fsdp = 32, 8
    mesh = make_mesh(mesh_config, tpu_devices(parse_topology("v6e-256")))
    assert dict(mesh.shape) == {"data": 32, "fsdp": 8, "sequence": 1, "tensor": 1}
    assert len({device.id for device in mesh.devices.flat}) == 256
