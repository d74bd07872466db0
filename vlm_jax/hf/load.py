"""A local transformers folder -> this project's model config and parameters (import, for initialisation).

    python -m vlm_jax.hf.load FOLDER            # prints the key-by-key report and the config.model keys

Reads safetensors only (pickle `.bin` weights are refused: loading them can execute code). SigLIP and CLIP two
towers and vision towers load here; PaliGemma and Gemma through vlm_jax.hf.paligemma.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from vlm_jax.config import ConfigError, base_config
from vlm_jax.hf import contrastive, weights
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.train_state import make_state_layout  # noqa: F401  (models are built unsharded; set on import)

CONTRASTIVE = {"siglip": "siglip", "clip": "clip", "siglip_vision_model": "vision", "clip_vision_model": "vision"}
LANGUAGE = ("paligemma", "gemma", "gemma2")


def read_config(folder: str):
    """The folder's transformers config (offline); one-line ConfigError when there is none or it is unreadable."""
    import transformers

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"{folder} has no config.json: not a transformers model folder")
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{folder}/config.json cannot be read by transformers: {str(e).splitlines()[0]}") from e


def load_folder(folder: str, scan: bool = False) -> tuple[ml_collections.ConfigDict, dict, weights.TensorReader]:
    """(a config whose model matches the folder's, our parameter tree (layer stacks stacked when `scan`), the
    key-by-key account); a one-line ConfigError for a folder that does not match exactly."""
    hf = read_config(folder)
    tensors = weights.read_safetensors(folder)
    if hf.model_type in LANGUAGE:
        from vlm_jax.hf import paligemma
        importer = paligemma.paligemma_import if hf.model_type == "paligemma" else paligemma.gemma_import
        params, values, reader = importer(tensors, hf.to_dict(), scan)
        if hf.model_type != "paligemma":  # a language model alone: a VLM's `lm`
            params = {"lm": params}
        return configured(values, "vlm", scan), params, reader
    if hf.model_type not in CONTRASTIVE:
        raise ConfigError(f"{folder} holds a {hf.model_type!r} model; importable: "
                          f"{', '.join([*CONTRASTIVE, *LANGUAGE])}")
    kind = CONTRASTIVE[hf.model_type]
    config = configured(contrastive.model_values(hf), "contrastive", scan)
    shapes = _shapes(config, kind)
    flat, reader = contrastive.import_params(tensors, config, kind, shapes, folder)
    params = weights.stack_all(_nest(flat), scan) if not (reader.missing or reader.mismatched) else {}
    return config, params, reader


def configured(values: dict[str, Any], task: str, scan: bool) -> ml_collections.ConfigDict:
    """The base config with `task`, model.scan and the model keys `values` ({"image.width": 768, ...})."""
    config = base_config()
    config.task = task
    config.model.scan = scan
    for key, value in values.items():
        node = config.model
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _shapes(config: ml_collections.ConfigDict, kind: str) -> dict[str, tuple[int, ...]]:
    """Our model's flat parameter shapes (layer stacks unstacked) for the import `kind`."""
    from vlm_jax.models.vit import ViT
    from vlm_jax.tasks import get_task
    from vlm_jax.tasks.towers import vit_config

    unscanned = ml_collections.ConfigDict(config.to_dict())
    unscanned.model.scan = False
    if kind == "vision":
        abstract = nnx.eval_shape(lambda: ViT(vit_config(unscanned.model), nnx.Rngs(0)))
        prefix = "image_encoder/"
    else:
        abstract = nnx.eval_shape(lambda: get_task(unscanned).build_model(nnx.Rngs(0)))
        prefix = ""
    state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {prefix + path: tuple(x.shape) for path, x in leaves_with_path_str(state)}


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        config, _, reader = load_folder(args.folder)
        print("\n".join(reader.report()))
        reader.check()
    except (ConfigError, ImportError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(config.model.to_dict(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
