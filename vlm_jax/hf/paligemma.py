"""Our decoder-only VLM (models/vlm.py, task "vlm") <-> transformers' `PaliGemmaForConditionalGeneration`.

The ViT (pool "none": every patch token, after the final LayerNorm) is SigLIP's vision tower without its head
(`post_layernorm` is our `ln_final`), the linear projector is `multi_modal_projector.linear`, and the Gemma LM is
the text model (hf/gemma_weights.py: gemma or gemma2). transformers inserts the projected image features
unscaled and scales only text embeddings by sqrt(width), as we do. Its positions are 1-based (ours 0-based:
RoPE sees only differences) and its prefix-LM mask comes from token_type_ids (0: image + prefix, 1: suffix).

The image token id is the tokenizer's vocabulary size (what the exported tokenizer gives "<image>"; without the
tokenizer, the LM's vocabulary size): never a text id, and text_config.vocab_size stays ours. Tensor names are
those of the published PaliGemma checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, no `lm_head`: tied), which transformers 5 loads with no missing or unexpected key; an
import also takes transformers 5's own names (`model.*`, `vision_tower.*` without `vision_model`).

Refused with a one-line ConfigError: the LLaVA projector ("mlp"), an image tower that is not exactly SigLIP's
(model.arch "clip", sin-cos position embeddings: hf/contrastive.py), parameters PaliGemma has no place for (a
class token, ...), and the Gemma features of gemma_weights.model_type.
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config import ConfigError
from vlm_jax.hf import contrastive
from vlm_jax.hf.gemma_weights import (abstract_params, check_tied, export_flat, gemma_import, gemma_rules,
                                      gemma_text_config, import_tree, lm_config_values, resolve_config)
from vlm_jax.hf.towers import Rule, linear_rules, vit_rules
from vlm_jax.hf.weights import TensorReader
from vlm_jax.models.vit import parse_variant
from vlm_jax.tasks.towers import gemma_config, vit_config

__all__ = ["paligemma_export", "paligemma_generation_config", "paligemma_import", "gemma_import", "canonical_names"]

VISION, PROJECTOR, TEXT = "vision_tower.vision_model", "multi_modal_projector", "language_model.model"
VIT_ACT, VIT_EPS = "gelu_pytorch_tanh", 1e-6
# other transformers namings of the same tensors -> the published checkpoints' names
CANONICAL_NAMES = ((r"^model\.language_model\.", f"{TEXT}."), (r"^model\.multi_modal_projector\.", f"{PROJECTOR}."),
                   (r"^(model\.)?vision_tower\.(vision_model\.)?", f"{VISION}."),
                   (r"^lm_head\.", "language_model.lm_head."))


def _rules(config: ml_collections.ConfigDict) -> list[Rule]:
    m = config.model
    lm = gemma_config(m).spec()
    return (vit_rules("image_encoder", VISION, vit_config(m, "none").encoder_spec(), clip=False, map_head=False)
            + linear_rules("projector/fc1", f"{PROJECTOR}.linear") + gemma_rules("lm", TEXT, lm))


def _check_exportable(config: ml_collections.ConfigDict) -> None:
    m = config.model
    if config.task != "vlm":
        raise ConfigError(f"PaliGemma export needs a decoder-only VLM (task 'vlm'), not task {config.task!r}")
    if m.vlm.projector != "linear":
        raise ConfigError(f"model.vlm.projector {m.vlm.projector!r} (LLaVA's two layers) has no equivalent in "
                          "PaliGemmaForConditionalGeneration, whose projector is one linear layer")
    family, problems = contrastive.vision_mismatches(m, "none")
    if family != "siglip":
        problems = [f"model.arch is {m.arch!r} (SigLIP is 'big_vision')"]
    if problems:
        raise ConfigError(f"the image tower is not exactly PaliGemma's SigLIP vision tower: {'; '.join(problems)}")


def _tokenizer(config: ml_collections.ConfigDict):
    """The run's sentencepiece tokenizer (data.tokenizer), None when the file is not here."""
    from data_pipelines.tokenizer import Tokenizer

    path = config.data.tokenizer
    return Tokenizer(path) if path and os.path.isfile(path) else None


def token_ids(config: ml_collections.ConfigDict) -> dict[str, int]:
    """pad/bos/eos_token_id of the run's tokenizer, or without it the ids of the tokenizers trained here (0 pad,
    1 EOS, 3 BOS; data_pipelines/tokenizer.py), which the task uses."""
    from vlm_jax.tasks.caption_loss import BOS_ID, EOS_ID, PAD_ID

    tokenizer = _tokenizer(config)
    if tokenizer is None:
        return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    return {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def image_token_id(config: ml_collections.ConfigDict) -> int:
    """The id of image positions: the tokenizer's vocabulary size (the id its exported files give "<image>",
    hf/tokenizer_files.py), else model.text.vocab_size. Never a text id; at or past the LM's vocabulary
    transformers looks it up as id 0, below it as an unused row, and replaces it by the image features either way."""
    tokenizer, vocab = _tokenizer(config), config.model.text.vocab_size
    if tokenizer is None:
        return vocab
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} pieces, more than "
                          f"model.text.vocab_size {vocab}")
    return tokenizer.vocab_size


def paligemma_generation_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """generation_config.json: the tokenizer's pad, BOS and EOS ids (generation stops at EOS)."""
    return token_ids(config)


def paligemma_export(params: dict, config: ml_collections.ConfigDict) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json of PaliGemmaForConditionalGeneration, its float32 tensors) of our VLM's parameters (scanned
    or listed stacks, as config.model.scan says). A prior_lm (PRIOR's frozen reference) is not part of the
    model and is left out."""
    _check_exportable(config)
    m = config.model
    lm = gemma_config(m).spec()
    tensors = export_flat(params, m.scan, _rules(config))
    vit = vit_config(m, "none")
    vspec, patch = vit.encoder_spec(), parse_variant(vit.variant)[1]
    vision_config = dict(model_type="siglip_vision_model", hidden_size=vspec.width, intermediate_size=vspec.mlp_dim,
                         num_hidden_layers=vspec.depth, num_attention_heads=vspec.num_heads, num_channels=3,
                         image_size=vit.image_size, patch_size=patch, hidden_act=VIT_ACT, layer_norm_eps=VIT_EPS,
                         attention_dropout=0.0, vision_use_head=False, projection_dim=lm.width)
    text_config = {**gemma_text_config(lm, m.lm.max_len, token_ids(config)),
                   "num_image_tokens": (vit.image_size // patch) ** 2}
    hf_config = dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                     image_token_index=image_token_id(config), vocab_size=lm.vocab_size, projection_dim=lm.width,
                     hidden_size=lm.width, tie_word_embeddings=True, dtype="float32", vision_config=vision_config,
                     text_config=text_config)
    return hf_config, tensors


def canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors under the published checkpoints' names, whichever transformers naming they come in."""
    out = {}
    for name, tensor in tensors.items():
        for pattern, replacement in CANONICAL_NAMES:
            name, count = re.subn(pattern, replacement, name)
            if count:
                break
        out[name] = tensor
    return out


def _vision_problems(vision: Any) -> list[str]:
    """What a resolved SiglipVisionConfig has that our ViT cannot compute exactly."""
    problems = [f"non-square {key} {getattr(vision, key)}" for key in ("image_size", "patch_size")
                if not isinstance(getattr(vision, key), int)]
    return problems + [f"{name} {value!r}" for name, value, want in (
        ("hidden_act", vision.hidden_act, VIT_ACT), ("layer_norm_eps", vision.layer_norm_eps, VIT_EPS),
        ("num_channels", vision.num_channels, 3), ("vision_use_head", vision.vision_use_head, False)) if value != want]


def paligemma_import(tensors: dict[str, np.ndarray], hf_config: dict, scan: bool
                     ) -> tuple[dict, dict[str, Any], TensorReader]:
    """A PaliGemmaForConditionalGeneration folder's tensors and config.json as (our VLM's parameters, stacks
    scanned when `scan`; our config.model keys: arch, image.*, vlm.projector, lm.*, text.vocab_size; the
    key-by-key reader). Raises the reader's one-line ConfigError when a key is missing, mismatched or left over."""
    from vlm_jax.hf.load import configured
    from vlm_jax.models.vlm import VisionLanguageModel

    hf = resolve_config(hf_config, ("paligemma",))
    problems = _vision_problems(hf.vision_config)
    if problems:
        raise ConfigError(f"this SigLIP vision tower has no exact equivalent here: {'; '.join(problems)}")
    values = {**contrastive.model_values(hf.vision_config), "vlm.projector": "linear",
              **lm_config_values(hf.text_config)}
    config = configured(values, "vlm", False)
    m = config.model
    abstract = abstract_params(lambda rngs: VisionLanguageModel(vit_config(m, "none"), gemma_config(m), "linear",
                                                                rngs))
    reader = TensorReader(canonical_names(tensors), "PaliGemma weights")
    check_tied(reader, "language_model.lm_head.weight", f"{TEXT}.embed_tokens.weight")
    return import_tree(reader, _rules(config), abstract, scan), values, reader
