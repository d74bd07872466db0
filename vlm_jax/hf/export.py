"""A workdir's checkpoint -> a transformers folder that loads offline: config.json, float32 safetensors, tokenizer
files, the image processor's config, generation_config.json (PaliGemma) and a model card.

The folder is written next to its destination and renamed into place, so an interrupted export leaves nothing
half-written under the destination's name.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.hf import contrastive, model_card
from vlm_jax.hf.weights import DEFAULT_SHARD_BYTES, write_safetensors
from vlm_jax.models.vit import parse_variant
from vlm_jax.param_init import workdir_params
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.workdir import is_remote, resolve

KINDS = ("auto", "siglip", "clip", "paligemma", "vision")
VISION_ONLY_TASKS = ("captioning", "coca")  # no transformers class for the whole model: the vision tower exports


def resolve_kind(config: ml_collections.ConfigDict, kind: str) -> str:
    """The export `kind` for this run ("auto" picks the exact one); a one-line ConfigError naming what differs when
    the model has no exact transformers class of that kind."""
    if kind not in KINDS:
        raise ConfigError(f"unknown export kind {kind!r}; choose from {', '.join(KINDS)}")
    m, task = config.model, config.task
    if kind == "auto":
        if task == "vlm":
            return "paligemma"
        if task in VISION_ONLY_TASKS:
            return "vision"
        kind = "siglip" if not contrastive.siglip_mismatches(m) else "clip" if not contrastive.clip_mismatches(m) \
            else "none"
        if kind == "none":
            raise ConfigError("these two towers have no exact transformers class: not SiglipModel ("
                              + "; ".join(contrastive.siglip_mismatches(m)) + "), not CLIPModel ("
                              + "; ".join(contrastive.clip_mismatches(m)) + ")")
        return kind
    if kind == "vision":
        family, problems = contrastive.vision_mismatches(m, contrastive.image_pool(config))
        if problems:
            raise ConfigError(f"the image tower is not exactly a {family} vision model: {'; '.join(problems)}")
        return kind
    if task in VISION_ONLY_TASKS:
        raise ConfigError(f"a {task} model has no transformers class (its text decoder has none); export its "
                          "vision tower with --as=vision")
    expected = "paligemma" if task == "vlm" else ("siglip", "clip")
    if kind not in expected:
        raise ConfigError(f"a {task} model does not export as {kind}; use --as={expected if task == 'vlm' else 'auto'}")
    if kind != "paligemma":
        problems = (contrastive.siglip_mismatches if kind == "siglip" else contrastive.clip_mismatches)(m)
        if problems:
            raise ConfigError(f"these two towers are not exactly a {kind} model: {'; '.join(problems)}")
    return kind


def load_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int, dict]:
    """(saved config, step, host numpy parameters) of a workdir's checkpoint (the newest by default)."""
    root = resolve(workdir)
    if not (root / "config.json").exists():
        raise ConfigError(f"{workdir} has no config.json: not a workdir written by vlm_jax.train")
    config = load_saved_config(root / "config.json")
    step, params = workdir_params(workdir, make_mesh(config.mesh), step)
    return config, step, jax.tree.map(np.asarray, jax.device_get(params))


def export_run(config: ml_collections.ConfigDict, step: int, params: dict, out: str, kind: str = "auto",
               workdir: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Writes the transformers folder `out` for parameters `params` of a run with `config`; returns a summary
    {"kind", "class", "step", "tensors", "image_tokens", "files"}. `workdir`: where evaluation results for the model
    card are. Nothing is left under `out` or beside it when a step fails."""
    from vlm_jax.hf import image_processor

    kind = resolve_kind(config, kind)
    token_ids = _token_ids(config) if kind != "vision" else {}
    if kind == "paligemma":
        from vlm_jax.hf import paligemma
        hf_config_dict, tensors = paligemma.paligemma_export(params, config)
        hf_config = _paligemma_config(hf_config_dict)
    else:
        hf_config = contrastive.hf_config(config, kind, token_ids)
        tensors = contrastive.export_tensors(params, config, kind)

    summary = {"kind": kind, "class": hf_config.architectures[0], "step": step, "tensors": len(tensors),
               "image_tokens": _image_tokens(config)}
    tmp = f"{out.rstrip('/')}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        hf_config.save_pretrained(tmp)
        files = ["config.json", *write_safetensors(tensors, tmp, max_shard_bytes)]
        if kind == "paligemma":
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(paligemma.paligemma_generation_config(config), f, indent=2)
            files.append("generation_config.json")
        files += _write_tokenizer(config, kind, tmp)
        family = "clip" if config.model.arch == "clip" else "siglip"
        extra = {"image_seq_length": summary["image_tokens"]} if kind == "paligemma" else None
        image_processor.write_image_processor(config, tmp, family, extra)
        files.append(image_processor.NAME)
        files += model_card.write(config, summary, workdir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {**summary, "files": sorted(files)}


class PeriodicExport:
    """`config.export_every`: the training run's exports into WORKDIR/hf (replaced each time) every N steps and at
    the end; the model's export kind and the hf extra are checked when the run starts, not at its first export."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        if config.export_every:
            try:
                import transformers  # noqa: F401
            except ImportError as e:
                raise ConfigError("export_every needs the hf extra (pip install -e '.[hf]')") from e
            resolve_kind(config, config.export_as)
            if is_remote(resolve(workdir)):
                raise ConfigError("export_every writes a local folder: export a remote workdir's checkpoints with "
                                  "python -m vlm_jax.export --out=LOCAL_DIR")

    def due(self, step: int) -> bool:
        return bool(self.config.export_every) and (step % self.config.export_every == 0
                                                   or step == self.config.total_steps)

    def __call__(self, step: int, params: Any) -> None:
        """Exports `params` (a sharded tree, gathered to every host) from process 0."""
        from jax.experimental import multihost_utils

        host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 \
            else jax.device_get(params)
        if jax.process_index() == 0:
            out = str(resolve(self.workdir) / "hf")
            export_run(self.config, step, jax.tree.map(np.asarray, host), out, self.config.export_as, self.workdir)
            print(f"exported step {step} to {out}", flush=True)


def _token_ids(config: ml_collections.ConfigDict) -> dict[str, int | None]:
    """pad / EOS / BOS ids of the run's tokenizer; a one-line ConfigError when it is missing."""
    from data_pipelines.tokenizer import Tokenizer

    if not config.data.tokenizer or not os.path.isfile(config.data.tokenizer):
        raise ConfigError(f"the run's tokenizer {config.data.tokenizer!r} is missing: the export needs it for "
                          "tokenizer.json")
    tokenizer = Tokenizer(config.data.tokenizer)
    return {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
            "bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None}


def _write_tokenizer(config: ml_collections.ConfigDict, kind: str, out: str) -> list[str]:
    """The tokenizer files of the run's sentencepiece model, encoding as its training did (none for a vision
    tower alone)."""
    from vlm_jax.hf.tokenizer_files import write_tokenizer_files

    if kind == "vision":
        return []
    if kind == "paligemma":  # the prompt builder adds BOS, separators and EOS; <image> marks image positions
        write_tokenizer_files(config.data.tokenizer, out, max_len=config.model.lm.max_len, add_bos=False,
                              add_eos=False, lower=dict(config.data.vlm).get("lower", True),
                              extra_special_tokens={"image_token": "<image>"})
    else:  # the contrastive pipeline's text: ids, EOS, padding to the model's length; SigLIP takes no mask
        names = ["input_ids"] if kind == "siglip" else ["input_ids", "attention_mask"]
        write_tokenizer_files(config.data.tokenizer, out, max_len=config.model.text.max_len, add_bos=False,
                              add_eos=True, lower=True, model_input_names=names)
    return ["tokenizer.json", "tokenizer_config.json"]


def _image_tokens(config: ml_collections.ConfigDict) -> int:
    """Image tokens per image of the run's ViT."""
    m = config.model
    return (m.image.image_size // parse_variant(m.image.variant)[1]) ** 2


def _paligemma_config(config_dict: dict):
    import transformers
    return transformers.PaliGemmaConfig(**config_dict)
