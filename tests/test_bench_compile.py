"""bench compile: topology names, the TPU compiler's report (HBM, FLOPs, roofline), the does-not-fit verdict,
and the CPU simulation when libtpu is missing."""

import json
import os
import subprocess
import sys

import pytest

from vlm_jax.parallel.topology import Topology, TopologyError, parse_topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names():
    assert parse_topology("v5p-256") == Topology("v5p", 128, "4x4x8")  # v5p names count TensorCores: 2 a chip
    assert parse_topology("v6e-256") == Topology("v6e", 256, "16x16")
    assert parse_topology("v5e-8") == Topology("v5e", 8, "2x4")
    assert parse_topology("v5p:2x2x2") == Topology("v5p", 8, "2x2x2")
    for bad in ("tpu-9", "v5p-7", "v6e-3", "v5e:2x2x2"):
        with pytest.raises(TopologyError, match=f"unknown TPU topology '{bad}'; known names: v4-8, .*v5p-256"):
            parse_topology(bad)


def bench_compile(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "vlm_jax.bench", "compile", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    return result.returncode, json.loads(lines[-1]) if lines else None, result.stderr.strip().splitlines()


@pytest.mark.slow
def test_report_comes_from_the_tpu_compiler():
    code, report, _ = bench_compile("--config=configs/demo/clip_tiny.py", "--topology=v5e-8",
                                    "--config.mesh.fsdp=8", "--config.mesh.data=1")
    assert code == 0
    assert report["compiled_for"] == "tpu (TPU v5 lite)" and report["libtpu_topology"] == "v5e:2x4"
    assert report["mesh"]["fsdp"] == 8 and report["fits"] is True
    assert report["opt_state_bytes_per_device"] == pytest.approx(2 * report["params_bytes_per_device"], rel=0.1)
    assert report["argument_bytes_per_device"] >= report["params_bytes_per_device"]
    assert 0.8 < report["compiler_vs_model_flops"] < 1.5  # XLA's count against the analytic model FLOPs
    assert report["step_time_lower_bound_s"] == max(report["roofline_compute_s"], report["roofline_memory_s"])
    assert 0 < report["mfu_ceiling"] <= 1 and 0 < report["mfu_ceiling_bytes_accessed"] <= 1
    assert report["roofline_memory_s"] == round(report["hbm_traffic_bytes_per_device"]
                                                / report["hbm_bytes_per_s_per_device"], 6)


@pytest.mark.slow
def test_a_step_that_does_not_fit_exits_1():
    """A 50M-token vocabulary replicated on every chip: 19 GB of embeddings on a 16 GiB v5e."""
    code, report, stderr = bench_compile("--config=configs/demo/clip_tiny.py", "--topology=v5e-4",
                                         "--config.model.text.vocab_size=50000000", "--config.batch_size=4")
    assert code == 1 and report["fits"] is False
    assert stderr[-1].startswith("error: does not fit: peak ") and stderr[-1].endswith(" > 16.00 GiB HBM per device")


def test_unknown_topology_is_one_line():
    code, report, stderr = bench_compile("--config=configs/demo/clip_tiny.py", "--topology=v5p-7")
    assert code == 2 and report is None
    assert stderr[-1].startswith("error: unknown TPU topology 'v5p-7'; known names: v4-8")


def test_topology_libtpu_does_not_know_is_one_line():
    code, report, stderr = bench_compile("--config=configs/demo/clip_tiny.py", "--topology=v5p:3x3x3")
    assert code == 2 and report is None
    assert stderr[-1].startswith("error: the installed libtpu does not know TPU topology 'v5p:3x3x3': ")
    assert "known names: v4-8" in stderr[-1]


@pytest.mark.slow
def test_simulates_on_cpu_without_libtpu(tmp_path):
    """With libtpu unimportable the same device count is compiled on CPU, and the report says so."""
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError('libtpu hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("TPU_LIBRARY_PATH", None)  # set by libtpu when an earlier test in this process imported it
    code, report, _ = bench_compile("--config=configs/demo/clip_tiny.py", "--topology=v5e-8",
                                    "--config.mesh.fsdp=8", "--config.mesh.data=1", env=env)
    assert code == 0
    assert report["compiled_for"].startswith("cpu (simulated 8 devices; not the TPU compiler: jax has no TPU")
    assert report["mesh"]["fsdp"] == 8 and report["devices"] == 8


def test_a_refusal_without_a_size_still_does_not_fit():
    """The compiler's out-of-HBM refusal decides the verdict even when its message gives no size."""
    from vlm_jax.bench_compile import _out_of_memory, does_not_fit
    refusal = _out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM (no size given)")
    assert refusal == {"temp_bytes_per_device": 0,
                       "compiler_error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM (no size given)"}
    report = {"fits": False, "peak_bytes_per_device": 1, "hbm_bytes_per_device": 2, **refusal}
    assert does_not_fit(report) == "does not fit: RESOURCE_EXHAUSTED: Ran out of memory on HBM (no size given)"
    assert _out_of_memory("INTERNAL: Mosaic failed to compile TPU kernel") is None
