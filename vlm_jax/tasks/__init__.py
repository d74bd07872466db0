"""Objectives: each supplies the model constructor, the loss, the metrics and the predict functions."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from vlm_jax.tasks.contrastive import ContrastiveTask

TASKS = {"contrastive": ContrastiveTask}


def get_task(config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    """The task object named by `config.task`; with a mesh, losses may use collectives over it."""
    return TASKS[config.task](config, mesh)
