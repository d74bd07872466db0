"""Our decoder-only VLM (models/vlm.py, task "vlm") <-> transformers' `PaliGemmaForConditionalGeneration`.

The ViT (pool "none": every patch token, after the final LayerNorm) is SigLIP's vision tower without its head
(`post_layernorm` is our `ln_final`), the linear projector is `multi_modal_projector.linear`, and the Gemma LM is
the text model (hf/gemma_weights.py: gemma or gemma2). transformers inserts the projected image features
unscaled and scales only text embeddings by sqrt(width), as we do. Its positions are 1-based (ours 0-based:
RoPE sees only differences) and its prefix-LM mask comes from token_type_ids (0: image + prefix, 1: suffix).

The image token id is our vocabulary size, outside the text vocabulary: transformers looks such ids up as id 0
and replaces them by the image features, so text_config.vocab_size stays ours. Tensor names are those of the
published PaliGemma checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, no `lm_head`: tied), which transformers 5 loads with no missing or unexpected key; an
import also takes transformers 5's own names (`model.*`, `vision_tower.*` without `vision_model`).

Refused with a one-line ConfigError: the LLaVA projector ("mlp"), OpenAI-CLIP towers (model.arch "clip"), image
encoder parameters SigLIP has no place for (class token, pre-LayerNorm, MAP head), and the Gemma features of
gemma_weights.model_type. A fixed sin-cos position embedding is written as the learned table it equals.
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config import ConfigError
from vlm_jax.hf.gemma_weights import (Entry, export_entries, export_layers, gemma_from_torch, gemma_text_config,
                                      gemma_to_torch, import_entries, import_layers, lm_config_values,
                                      resolve_config, same, transpose)
from vlm_jax.hf.weights import (TensorReader, conv_from_torch, conv_to_torch, heads_in_from_torch, heads_in_to_torch,
                                heads_out_from_torch, heads_out_to_torch, stack_layers)
from vlm_jax.models.layers import SIZES as VIT_SIZES
from vlm_jax.models.layers import sincos_2d
from vlm_jax.models.vit import parse_variant
from vlm_jax.tasks.towers import gemma_config, vit_config

VISION, PROJECTOR, TEXT = "vision_tower.vision_model.", "multi_modal_projector.", "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
VIT_ACT, VIT_EPS = "gelu_pytorch_tanh", 1e-6
VIT_KEYS = {"patch_embed", "posemb", "encoder"}
NO_SIGLIP_PLACE = {"cls_token": "a class token", "ln_pre": "a LayerNorm before the encoder (CLIP's ln_pre)",
                   "map_head": "a MAP head"}
# other transformers namings of the same tensors -> the published checkpoints' names
CANONICAL_NAMES = ((r"^model\.language_model\.", TEXT), (r"^model\.multi_modal_projector\.", PROJECTOR),
                   (r"^(model\.)?vision_tower\.(vision_model\.)?", VISION), (r"^lm_head\.", "language_model.lm_head."))


def _vit_block_entries(width: int, mlp_dim: int, heads: int) -> list[Entry]:
    def heads_bias(name: str) -> Entry:
        return Entry(f"self_attn.{name[0]}_proj.bias", ("attn", name, "bias"), lambda b: np.reshape(b, -1),
                     lambda b: np.reshape(b, (heads, -1)), (width,))

    entries = [Entry(f"self_attn.{name[0]}_proj.weight", ("attn", name, "kernel"), heads_in_to_torch,
                     lambda w: heads_in_from_torch(w, heads), (width, width)) for name in ("query", "key", "value")]
    entries += [heads_bias(name) for name in ("query", "key", "value")]
    entries += [Entry("self_attn.out_proj.weight", ("attn", "out", "kernel"), heads_out_to_torch,
                      lambda w: heads_out_from_torch(w, heads), (width, width)),
                Entry("self_attn.out_proj.bias", ("attn", "out", "bias"), same, same, (width,)),
                Entry("mlp.fc1.weight", ("mlp", "fc1", "kernel"), transpose, transpose, (mlp_dim, width)),
                Entry("mlp.fc1.bias", ("mlp", "fc1", "bias"), same, same, (mlp_dim,)),
                Entry("mlp.fc2.weight", ("mlp", "fc2", "kernel"), transpose, transpose, (width, mlp_dim)),
                Entry("mlp.fc2.bias", ("mlp", "fc2", "bias"), same, same, (width,))]
    return entries + _norm_entries("layer_norm1", ("ln1",), width) + _norm_entries("layer_norm2", ("ln2",), width)


def _norm_entries(name: str, path: tuple[str, ...], width: int) -> list[Entry]:
    return [Entry(f"{name}.weight", (*path, "scale"), same, same, (width,)),
            Entry(f"{name}.bias", (*path, "bias"), same, same, (width,))]


def _vit_top_entries(width: int, patch: int, tokens: int) -> list[Entry]:
    return [Entry("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), conv_to_torch, conv_from_torch,
                  (width, 3, patch, patch)),
            Entry("embeddings.patch_embedding.bias", ("patch_embed", "bias"), same, same, (width,)),
            Entry("embeddings.position_embedding.weight", ("posemb",), same, same, (tokens, width)),
            *_norm_entries("post_layernorm", ("encoder", "ln_final"), width)]


def _projector_entries(image_width: int, lm_width: int) -> list[Entry]:
    return [Entry("linear.weight", ("fc1", "kernel"), transpose, transpose, (lm_width, image_width)),
            Entry("linear.bias", ("fc1", "bias"), same, same, (lm_width,))]


def _check_exportable(params: dict, config: ml_collections.ConfigDict) -> None:
    m = config.model
    if config.task != "vlm":
        raise ConfigError(f"PaliGemma export needs a decoder-only VLM (task 'vlm'), not task {config.task!r}")
    if m.vlm.projector != "linear":
        raise ConfigError(f"model.vlm.projector {m.vlm.projector!r} (LLaVA's two layers) has no equivalent in "
                          "PaliGemmaForConditionalGeneration, whose projector is one linear layer")
    if m.get("arch", "big_vision") != "big_vision":
        raise ConfigError(f"model.arch {m.arch!r}: PaliGemma's SigLIP vision tower has big_vision's conventions "
                          "(tanh GELU, LayerNorm eps 1e-6, no pre-LayerNorm)")
    extra = sorted(set(params["image_encoder"]) - VIT_KEYS)
    if extra:
        found = ", ".join(f"{NO_SIGLIP_PLACE.get(key, 'a parameter')} ({key})" for key in extra)
        raise ConfigError(f"the image encoder has {found}: PaliGemma's SigLIP vision tower has no place for it")


def token_ids(config: ml_collections.ConfigDict) -> dict[str, int]:
    """pad/bos/eos_token_id of the run's tokenizer (data.tokenizer) when the file is here, else the ids of the
    tokenizers trained here (0 pad, 1 EOS, 3 BOS; data_pipelines/tokenizer.py), which the task uses."""
    from vlm_jax.tasks.caption_loss import BOS_ID, EOS_ID, PAD_ID

    path = config.data.tokenizer
    if path and os.path.isfile(path):
        from data_pipelines.tokenizer import Tokenizer
        tokenizer = Tokenizer(path)
        return {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def paligemma_generation_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """generation_config.json: the tokenizer's pad, BOS and EOS ids (generation stops at EOS)."""
    return token_ids(config)


def paligemma_export(params: dict, config: ml_collections.ConfigDict) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json of PaliGemmaForConditionalGeneration, its float32 tensors) of our VLM's parameters (scanned
    or listed stacks, as config.model.scan says). A prior_lm (PRIOR's frozen reference) is not part of the
    model and is left out."""
    _check_exportable(params, config)
    m, scan = config.model, config.model.scan
    vit = vit_config(m, pool="none")
    vspec, patch = vit.encoder_spec(), parse_variant(vit.variant)[1]
    grid = vit.image_size // patch
    lm = gemma_config(m).spec()
    image = dict(params["image_encoder"])
    if vit.posemb == "sincos2d":
        image["posemb"] = sincos_2d(grid, grid, vspec.width)
    tensors = {
        **export_entries(image, _vit_top_entries(vspec.width, patch, grid * grid), VISION),
        **export_layers(image["encoder"]["blocks"], scan,
                        _vit_block_entries(vspec.width, vspec.mlp_dim, vspec.num_heads), f"{VISION}encoder.layers."),
        **export_entries(params["projector"], _projector_entries(vspec.width, lm.width), PROJECTOR),
        **gemma_to_torch(params["lm"], lm, scan, TEXT)}
    vision_config = dict(model_type="siglip_vision_model", hidden_size=vspec.width, intermediate_size=vspec.mlp_dim,
                         num_hidden_layers=vspec.depth, num_attention_heads=vspec.num_heads, num_channels=3,
                         image_size=vit.image_size, patch_size=patch, hidden_act=VIT_ACT, layer_norm_eps=VIT_EPS,
                         attention_dropout=0.0, vision_use_head=False, projection_dim=lm.width)
    text_config = {**gemma_text_config(lm, m.lm.max_len, token_ids(config)), "num_image_tokens": grid * grid}
    hf_config = dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                     image_token_index=lm.vocab_size, vocab_size=lm.vocab_size, projection_dim=lm.width,
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


def _vision_values(vision: Any) -> dict[str, Any]:
    """Our model.image keys for a resolved SiglipVisionConfig; a one-line ConfigError for what ours lacks."""
    sizes = {name: getattr(vision, name) for name in ("image_size", "patch_size")}
    problems = [f"non-square {key} {value}" for key, value in sizes.items() if not isinstance(value, int)]
    problems += [f"{name} {value!r}" for name, value, want in (
        ("hidden_act", vision.hidden_act, VIT_ACT), ("layer_norm_eps", vision.layer_norm_eps, VIT_EPS),
        ("num_channels", vision.num_channels, 3)) if value != want]
    if problems:
        raise ConfigError(f"this SigLIP vision tower has no exact equivalent here: {'; '.join(problems)}")
    shape = (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.num_attention_heads)
    name = next((size for size, dims in VIT_SIZES.items() if dims == shape), "B")
    overrides = {f"model.image.{key}": value for key, value, base in zip(
        ("width", "depth", "mlp_dim", "num_heads"), shape, VIT_SIZES[name]) if value != base}
    return {"model.image.variant": f"{name}/{vision.patch_size}", "model.image.image_size": vision.image_size,
            "model.image.pool": "none", "model.image.posemb": "learn", **overrides}


def paligemma_import(tensors: dict[str, np.ndarray], hf_config: dict, scan: bool
                     ) -> tuple[dict, dict[str, Any], TensorReader]:
    """A PaliGemmaForConditionalGeneration folder's tensors and config.json as (our VLM's parameters, stacks
    scanned when `scan`; our config keys: model.image.*, model.vlm.projector, model.lm.*, model.text.vocab_size;
    the key-by-key reader). Raises the reader's one-line ConfigError when a key is missing, mismatched or left
    over."""
    hf = resolve_config(hf_config, ("paligemma",))
    vision, text = hf.vision_config, hf.text_config
    values = {**_vision_values(vision), "model.vlm.projector": "linear", **lm_config_values(text)}
    width, grid = vision.hidden_size, vision.image_size // vision.patch_size
    reader = TensorReader(canonical_names(tensors), "PaliGemma weights")
    image = import_entries(reader, _vit_top_entries(width, vision.patch_size, grid * grid), VISION)
    blocks = import_layers(reader, vision.num_hidden_layers, _vit_block_entries(
        width, vision.intermediate_size, vision.num_attention_heads), f"{VISION}encoder.layers.")
    projector = import_entries(reader, _projector_entries(width, text.hidden_size), PROJECTOR)
    lm = gemma_from_torch(reader, text, scan, TEXT, LM_HEAD)  # checks the reader's account
    image["encoder"]["blocks"] = stack_layers(blocks, scan)
    return {"image_encoder": image, "projector": projector, "lm": lm}, values, reader
