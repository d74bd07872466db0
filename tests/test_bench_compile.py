"""bench compile: topology names, and a simulated ahead-of-time compile reporting per-device bytes."""

import json
import os
import subprocess
import sys

import pytest

from vlm_jax.bench_compile import parse_topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names():
    assert parse_topology("v5p-256") == ("v5p", 128)  # v5p counts TensorCores: 2 per chip
    assert parse_topology("v5e-16") == ("v5e", 16)
    with pytest.raises(ValueError, match="unknown topology 'tpu-9'"):
        parse_topology("tpu-9")


@pytest.mark.slow
def test_simulated_compile_reports_bytes_per_device():
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.bench", "compile", "--config=configs/demo/clip_tiny.py",
         "--topology=v5e-8", "--config.mesh.fsdp=8", "--config.mesh.data=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compiled_for"].startswith("cpu (simulated 8 devices")
    assert report["mesh"]["fsdp"] == 8 and report["fits"] is True
    assert report["opt_state_bytes_per_device"] == pytest.approx(2 * report["params_bytes_per_device"], rel=0.1)
    assert report["argument_bytes_per_device"] >= report["params_bytes_per_device"]
