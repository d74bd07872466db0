"""W&B logging in offline mode: metrics by step and the resolved config in the run's files; resume keeps the run."""

import json
import struct
import sys
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from vlm_jax.config import ConfigError, base_config, validate
from vlm_jax.metrics import MetricsWriter
from vlm_jax.wandb_writer import RUN_ID_FILE

BLOCK, HEADER = 32768, 7  # the LevelDB log format of .wandb files, after a 7-byte ':W&B' file header


def read_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # block padding
            pos += left
            continue
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def history(records: list) -> dict[int, dict[str, float]]:
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def run_config(records: list) -> dict:
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return {item.key: json.loads(item.value_json) for item in run.config.update}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = base_config()
    config.wandb.project, config.wandb.mode, config.batch_size = "vlm-test", "offline", 32
    return config


def test_offline_run_has_metrics_config_and_resumes(tmp_path, offline):
    workdir = tmp_path / "run"
    workdir.mkdir()
    writer = MetricsWriter(workdir, enabled=True, config=offline)
    writer.write(1, {"loss": 2.5, "goodput/fraction": 0.5})
    writer.write(2, {"loss": 2.0, "goodput/fraction": 0.75})
    writer.write(2, {"eval/accuracy": 0.3})  # an evaluation at a logged step joins that step
    writer.close()
    run_id = (workdir / RUN_ID_FILE).read_text()

    resumed = MetricsWriter(workdir, resumed_step=2, enabled=True, config=offline)
    resumed.write(3, {"loss": 1.5, "goodput/fraction": 1.0})
    resumed.close()
    wandb.teardown()  # the wandb-core service writes the last records when it stops (at exit in a real run)

    files = sorted((tmp_path / "wandb_dir").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one W&B run (the same id), written by two attempts
    first, second = (read_records(path) for path in files)
    assert history(first) == {1: {"loss": 2.5, "goodput/fraction": 0.5},
                              2: {"loss": 2.0, "goodput/fraction": 0.75, "eval/accuracy": 0.3}}
    assert history(second) == {3: {"loss": 1.5, "goodput/fraction": 1.0}}
    config = run_config(first)
    assert config["batch_size"] == 32 and config["wandb"]["project"] == "vlm-test"
    assert config["model"]["image"]["variant"] == offline.model.image.variant


def test_only_the_logging_process_starts_a_run(tmp_path, offline):
    MetricsWriter(tmp_path, enabled=False, config=offline).close()
    assert not (tmp_path / RUN_ID_FILE).exists() and not (tmp_path / "wandb_dir").exists()


def test_missing_package_is_one_line_error_naming_the_extra(tmp_path, offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"wandb is not installed; install the extra: pip install -e '.\[wandb\]'"):
        MetricsWriter(tmp_path, enabled=True, config=offline)


def test_off_by_default_and_mode_is_checked(tmp_path):
    config = base_config()
    config.data.train_shards, config.data.tokenizer = "x", "y"
    MetricsWriter(tmp_path, enabled=True, config=config).close()
    assert not (tmp_path / RUN_ID_FILE).exists()
    config.wandb.mode = "cloud"
    with pytest.raises(ConfigError, match="'wandb.mode' is 'cloud'"):
        validate(config)
