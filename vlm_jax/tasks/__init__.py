"""Objectives: each supplies the model constructor, the loss, the metrics and the predict functions."""

from __future__ import annotations

import ml_collections

from vlm_jax.tasks.contrastive import ContrastiveTask

TASKS = {"contrastive": ContrastiveTask}


def get_task(config: ml_collections.ConfigDict):
    """The task object named by `config.task`."""
    return TASKS[config.task](config)
