"""Weights & Biases logging (the optional `wandb` extra), turned on by `config.wandb.project`.

The run logs the same scalars as metrics.jsonl, by step, and the resolved config. Its id is kept in
`workdir/wandb_run_id`, so a resumed training run continues the same W&B run. W&B ignores a step at or below one it
already has, so after a crash the steps between the checkpoint and the crash keep their first values there
(metrics.jsonl has the rerun's). Local files go to `$WANDB_DIR`, else to the workdir when it is local.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Mapping

import ml_collections

from vlm_jax.config import ConfigError
from vlm_jax.workdir import is_remote, resolve

RUN_ID_FILE = "wandb_run_id"


class WandbWriter:
    """One W&B run per workdir; create it on process 0 only."""

    def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("config key 'wandb.project' is set but wandb is not installed; install the extra: "
                              "pip install -e '.[wandb]'") from None
        root = resolve(workdir)
        id_file = root / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id)
        local_dir = None if is_remote(root) or "WANDB_DIR" in os.environ else os.fspath(root)
        options = config.wandb
        self._run = wandb.init(project=options.project, entity=options.entity, group=options.group,
                               name=options.name or root.name, mode=options.mode, id=run_id, resume="allow",
                               dir=local_dir, config=json.loads(config.to_json()))

    @property
    def run_id(self) -> str:
        return self._run.id

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log({key: float(value) for key, value in scalars.items()}, step=step)

    def close(self) -> None:
        self._run.finish()
