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

from data_pipelines import eval_split, input_pipeline
from data_pipelines.samples import DataError
from vlm_jax import checkpoint
from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.evaluators.common import apply_in_batches
from vlm_jax.evaluators.retrieval import retrieval_recall
from vlm_jax.evaluators.zeroshot import class_embeddings, zeroshot_accuracy
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import activation_sharding, batch_sharding, data_parallel_size
from vlm_jax.tasks import get_task
from vlm_jax.train_state import StateLayout, make_state_layout
from vlm_jax.workdir import resolve

# Bad input: one `error:` line and exit 2, as vlm_jax.train does.
USER_ERRORS = (ConfigError, checkpoint.CheckpointMismatchError, FileNotFoundError, ValueError, DataError)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A held-out split on the host: images [N,H,W,3], captions [M,L] with their image indices text_image [M]
    (every reference caption), labels [N] (-1: none), prompts [C,T,L] (None: no class names)."""

    images: np.ndarray
    texts: np.ndarray
    text_image: np.ndarray
    labels: np.ndarray
    prompts: np.ndarray | None

    @property
    def has_captions(self) -> bool:
        """Retrieval runs only on a split with captions (a label-only set would rank identical pad texts)."""
        return len(self.texts) > 0

    @property
    def has_class_labels(self) -> bool:
        """Zero-shot classification runs when every image has a label and there are class prompts."""
        return self.prompts is not None and bool(np.all(self.labels >= 0))


def eval_preprocessing(config: ml_collections.ConfigDict) -> str:
    """`config.data.pp_eval`, or a centre crop with training's pixel value range (default_pp_eval)."""
    data, image_size = config.data, config.model.image.image_size
    pp_train = data.pp_train or input_pipeline.default_pp_train(image_size, config.model.text.max_len)
    return data.pp_eval or eval_split.default_pp_eval(image_size, pp_train)


def load_eval_data(config: ml_collections.ConfigDict) -> EvalData | None:
    """The split named by `config.data.eval_shards` preprocessed by eval_preprocessing, or None when there is
    none; a one-line ConfigError when its images do not fit the model or it offers nothing to evaluate."""
    data, image_size = config.data, config.model.image.image_size
    if data.eval_shards is None:
        return None
    pp = eval_preprocessing(config)
    split = eval_split.load_eval_split(data.eval_shards, data.tokenizer, image_size=image_size,
                                       text_len=config.model.text.max_len, pp=pp)
    if split["image"].shape[1:] != (image_size, image_size, 3):
        raise ConfigError(f"data.pp_eval {pp!r} gives images of shape {split['image'].shape[1:]}, but "
                          f"model.image.image_size is {image_size}")
    prompts = None
    if data.classnames is not None:
        classnames, templates = read_json_list(data.classnames), read_json_list(data.templates)
        prompts = eval_split.tokenize_class_prompts(
            data.tokenizer, classnames, templates, config.model.text.max_len)
        if split["label"].max() >= len(classnames):
            raise ConfigError(f"{data.eval_shards} has label {split['label'].max()} but {data.classnames} names "
                              f"only {len(classnames)} classes")
    eval_data = EvalData(split["image"], split["text"], split["text_image"], split["label"], prompts)
    if not (eval_data.has_captions or eval_data.has_class_labels):
        raise ConfigError(f"nothing to evaluate in {data.eval_shards}: it has no captions (retrieval) and no "
                          f"labels for every image with data.classnames (zero-shot)")
    return eval_data


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
                   batch_size: int, *, require_finite: bool = False) -> dict[str, float]:
    """Retrieval recall (when the split has captions) and zero-shot accuracy (when it has labels and prompts).

    NaN embeddings count as misses; with `require_finite`, they raise FloatingPointError instead.
    """
    def embed(fn: Callable[[Any, jax.Array], jax.Array], array: np.ndarray, what: str) -> np.ndarray:
        embeddings = apply_in_batches(lambda x: fn(params, x), array, batch_size, sharding)
        if require_finite and not np.isfinite(embeddings).all():
            bad = int(np.sum(~np.all(np.isfinite(embeddings), axis=-1)))
            raise FloatingPointError(f"{bad} of {len(embeddings)} {what} embeddings are not finite: the "
                                     f"parameters are probably NaN or inf")
        return embeddings

    image_emb = embed(embedders.image, data.images, "image")
    results = {}
    if data.has_captions:
        results.update(retrieval_recall(image_emb, embed(embedders.text, data.texts, "caption"), data.text_image))
    if data.has_class_labels:
        num_classes, _, length = data.prompts.shape
        prompt_emb = embed(embedders.text, data.prompts.reshape(-1, length), "class prompt")
        results.update(zeroshot_accuracy(image_emb, class_embeddings(prompt_emb, num_classes), data.labels))
    return results


def evaluate_workdir(workdir: str) -> dict[str, Any]:
    """Evaluates the newest checkpoint in `workdir` with the config saved there; FloatingPointError when the
    checkpoint's embeddings are not finite."""
    config = load_saved_config(resolve(workdir) / "config.json")
    mesh = make_mesh(config.mesh)
    task = get_task(config)
    layout = make_state_layout(task, config, mesh)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        params = checkpoint.restore_params(manager, step, layout.abstract_state)
    finally:
        manager.close()
    data = load_eval_data(config)
    if data is None:
        raise ConfigError("config.data.eval_shards is not set: nothing to evaluate on")
    sharding = batch_sharding(mesh, config.sharding_rules)
    results = run_evaluators(make_embedders(task, layout, mesh), params, data, sharding,
                             eval_batch_size(config, sharding), require_finite=True)
    return {"step": step, **results}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with eval_results.json written; 2 (one `error:` line) for bad input; 3 for non-finite results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    try:
        results = evaluate_workdir(args.workdir)
    except USER_ERRORS as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # grain appends traceback notes
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        (resolve(args.workdir) / "eval_results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
