"""Evaluation: zero-shot classification and image-text retrieval, during training and standalone.

    python -m vlm_jax.evaluate --workdir=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from data_pipelines import eval_split
from vlm_jax import checkpoint
from vlm_jax.config import load_saved_config
from vlm_jax.evaluators.common import apply_in_batches
from vlm_jax.evaluators.retrieval import retrieval_recall
from vlm_jax.evaluators.zeroshot import class_embeddings, zeroshot_accuracy
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import activation_sharding, batch_sharding, data_parallel_size
from vlm_jax.tasks import get_task
from vlm_jax.train_state import StateLayout, make_state_layout


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A held-out split on the host: images [N,H,W,3], captions [N,L], labels [N], prompts [C,T,L]."""

    images: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    prompts: np.ndarray | None


def load_eval_data(config: ml_collections.ConfigDict) -> EvalData | None:
    """The split named by `config.data.eval_shards`, or None when there is none."""
    data = config.data
    if data.eval_shards is None:
        return None
    split = eval_split.load_eval_split(
        data.eval_shards, data.tokenizer, image_size=config.model.image.image_size,
        text_len=config.model.text.max_len)
    prompts = None
    if data.classnames is not None:
        classnames, templates = read_json_list(data.classnames), read_json_list(data.templates)
        prompts = eval_split.tokenize_class_prompts(
            data.tokenizer, classnames, templates, config.model.text.max_len)
    return EvalData(split["image"], split["text"], split["label"], prompts)


def read_json_list(path: str | None) -> list[str]:
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"zero-shot class names / templates file not found: {path}")
    with open(path) as f:
        return json.load(f)


def eval_batch_size(config: ml_collections.ConfigDict, sharding: NamedSharding) -> int:
    """The configured eval batch size rounded up to a multiple of the data-parallel size."""
    ways = data_parallel_size(sharding.mesh, config.sharding_rules)
    return -(-config.data.eval_batch_size // ways) * ways


@dataclasses.dataclass(frozen=True)
class Embedders:
    """Jitted (params, batch) -> L2-normalised embeddings; built once, so repeated evals do not recompile."""

    image: Callable[[Any, jax.Array], jax.Array]
    text: Callable[[Any, jax.Array], jax.Array]


def make_embedders(task, layout: StateLayout, mesh: Mesh) -> Embedders:
    """Jitted image and text embedding with the training step's activation sharding (so fused attention kernels
    run per device)."""
    def on_mesh(embed):
        def run(params, x):
            with activation_sharding(mesh, task.config.sharding_rules):
                return embed(layout.merge(params), x)
        return jax.jit(run)

    return Embedders(image=on_mesh(task.embed_image), text=on_mesh(task.embed_text))


def run_evaluators(embedders: Embedders, params: Any, data: EvalData, sharding: NamedSharding,
                   batch_size: int) -> dict[str, float]:
    """Zero-shot accuracy (when the split has labels and prompts) and retrieval recall."""
    image_emb = apply_in_batches(lambda x: embedders.image(params, x), data.images, batch_size, sharding)
    text_emb = apply_in_batches(lambda x: embedders.text(params, x), data.texts, batch_size, sharding)
    results = retrieval_recall(image_emb, text_emb)
    if data.prompts is not None and np.all(data.labels >= 0):
        num_classes, _, length = data.prompts.shape
        prompt_emb = apply_in_batches(lambda x: embedders.text(params, x),
                                      data.prompts.reshape(-1, length), batch_size, sharding)
        results.update(zeroshot_accuracy(image_emb, class_embeddings(prompt_emb, num_classes), data.labels))
    return results


def evaluate_workdir(workdir: str) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `workdir` with the config saved there."""
    config = load_saved_config(os.path.join(workdir, "config.json"))
    mesh = make_mesh(config.mesh)
    task = get_task(config)
    layout = make_state_layout(task, config, mesh)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    params = checkpoint.restore_params(manager, step, layout.abstract_state)
    data = load_eval_data(config)
    if data is None:
        raise ValueError("config.data.eval_shards is not set: nothing to evaluate on")
    sharding = batch_sharding(mesh, config.sharding_rules)
    results = run_evaluators(make_embedders(task, layout, mesh), params, data, sharding,
                             eval_batch_size(config, sharding))
    return {"step": step, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    try:
        results = evaluate_workdir(args.workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
