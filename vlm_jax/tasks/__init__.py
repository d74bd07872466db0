"""Objectives: each supplies the model constructor, the loss, the metrics and the predict functions.

The train step calls `task.loss(model, batch, rngs, step=step)`: `rngs` the step's randomness, `step` its number
(a traced int32 scalar) for an objective that changes during training; both may be left out outside training.
"""

from __future__ import annotations

import importlib

import ml_collections
from jax.sharding import Mesh

# name -> "module:class", imported on use: the loss modules here are also imported by vlm_jax.parallel, which
# the task classes import in turn.
TASKS = {"contrastive": "vlm_jax.tasks.contrastive:ContrastiveTask",
         "captioning": "vlm_jax.tasks.captioning:CaptioningTask",
         "coca": "vlm_jax.tasks.coca:CocaTask",
         "vlm": "vlm_jax.tasks.vlm:VlmTask"}


def get_task(config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    """The task object named by `config.task`; with a mesh, losses may use collectives over it."""
    module, _, name = TASKS[config.task].partition(":")
    return getattr(importlib.import_module(module), name)(config, mesh)
