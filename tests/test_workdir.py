"""Workdirs on object stores: every file goes through vlm_jax.workdir (etils.epath), tested against an in-memory
fsspec filesystem registered as gs:// that, like GCS, cannot append. Nothing may land under ./gs:/ locally."""

import json
import os

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

from vlm_jax import checkpoint
from vlm_jax.config import base_config, load_saved_config, save_config
from vlm_jax.metrics import MetricsWriter
from vlm_jax.workdir import resolve


class FakeGCS(MemoryFileSystem):
    """gs:// in memory, with its own store; appending is refused as GCS refuses it."""

    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes finalize_on_close for gcsfs
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return MemoryFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    monkeypatch.setitem(fsspec_registry, "gs", FakeGCS)
    monkeypatch.setitem(fsspec_registry, "gcs", FakeGCS)
    monkeypatch.chdir(tmp_path)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one filesystem per scheme
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    yield epath.Path("gs://bucket/run")
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(tmp_path) == [], "a gs:// workdir wrote to local disk"


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(resolve("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(resolve("run")) == str(tmp_path / "run")
    assert os.fspath(resolve(f"file://{tmp_path}/x")) == f"{tmp_path}/x"
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        resolve("memory://run")


def test_metrics_tensorboard_and_config_on_a_gs_workdir(fake_gcs):
    writer = MetricsWriter("gs://bucket/run", enabled=True)
    for step in (1, 2):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    lines = (fake_gcs / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert any(path.name.startswith("events.") for path in (fake_gcs / "tensorboard").iterdir())

    resumed = MetricsWriter("gs://bucket/run", resumed_step=1, enabled=True)  # step 2 was after the checkpoint
    resumed.write(2, {"loss": 0.25})
    resumed.close()
    assert [json.loads(line) for line in (fake_gcs / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.25}]

    config = base_config()
    config.total_steps, config.data.train_shards, config.data.tokenizer = 77, "train/*.tar", "spm.model"
    save_config(config, resolve("gs://bucket/run") / "config.json")
    assert load_saved_config(fake_gcs / "config.json").total_steps == 77


def test_checkpoints_of_a_gs_workdir_go_to_its_url(fake_gcs, monkeypatch):
    """Orbax writes gs:// arrays through tensorstore's own GCS client (not reachable here), so this checks the
    directory the manager is given: the URL, not ./gs:/bucket/... as before."""
    given = {}

    def capture(directory, **kwargs):
        given["directory"] = directory
        raise RuntimeError("captured")

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", capture)
    with pytest.raises(RuntimeError, match="captured"):
        checkpoint.make_manager("gs://bucket/run", 1)
    assert os.fspath(given["directory"]) == "gs://bucket/run/checkpoints"
