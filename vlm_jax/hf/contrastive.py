"""Two towers and vision towers <-> transformers' SiglipModel, CLIPModel, SiglipVisionModel and CLIPVisionModel.

Only shapes with an exact transformers equivalent export; every other gets the list of what differs:
- SiglipModel: model.arch "big_vision", a MAP-pooled ViT with learned position embeddings of exactly the patch
  count and no image projection, a bidirectional text tower pooled at the last token through a biased linear head.
  A softmax-trained model exports with logit_bias = 0.
- CLIPModel: model.arch "clip" (class token, pre-encoder LayerNorm, quick GELU, eps 1e-5, no patch bias, bias-free
  projections), image pool "tok", a causal text tower pooled at the first EOS, the softmax loss (no logit bias).
- A vision tower alone: SiglipVisionModel (MAP head, or none for a ViT that passes every token on) or
  CLIPVisionModel (pool "tok").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.config import ConfigError
from vlm_jax.hf import weights
from vlm_jax.hf.towers import Rule, export, import_, linear_rules, map_head_in_proj, text_rules, vit_rules
from vlm_jax.models.vit import parse_variant
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.tasks.towers import text_config, vit_config

TEXT_TOKENS = {"pad_token_id", "bos_token_id", "eos_token_id"}


def siglip_mismatches(m: ml_collections.ConfigDict) -> list[str]:
    """Why the two towers of model config `m` are not exactly a SiglipModel (empty: they are)."""
    return [reason for bad, reason in (
        (m.arch != "big_vision", f"model.arch is {m.arch!r} (SigLIP is 'big_vision')"),
        (m.image.pool != "map", f"image pool {m.image.pool!r} (SigLIP pools with a MAP head)"),
        (m.image.posemb != "learn", f"image posemb {m.image.posemb!r} (SigLIP learns its position embeddings)"),
        (m.image_projection, "an image projection (SigLIP's image embedding is the MAP head's output: "
                             "model.image_projection=False)"),
        (m.text.pool != "last", f"text pool {m.text.pool!r} (SigLIP pools the last token)"),
    ) if bad]


def clip_mismatches(m: ml_collections.ConfigDict) -> list[str]:
    """Why the two towers of model config `m` are not exactly a CLIPModel (empty: they are)."""
    return [reason for bad, reason in (
        (m.arch != "clip", f"model.arch is {m.arch!r} (CLIP needs 'clip')"),
        (m.image.pool != "tok", f"image pool {m.image.pool!r} (CLIP pools its class token)"),
        (m.image.posemb != "learn", f"image posemb {m.image.posemb!r} (CLIP learns its position embeddings)"),
        (not m.image_projection, "no image projection (CLIP projects both towers)"),
        (m.text.pool != "eos", f"text pool {m.text.pool!r} (CLIP pools the first EOS)"),
        (m.loss != "softmax", f"the {m.loss} loss (CLIPModel has no logit bias)"),
    ) if bad]


def vision_mismatches(m: ml_collections.ConfigDict, pool: str) -> tuple[str, list[str]]:
    """('siglip' or 'clip', why the image tower with `pool` is not exactly that vision model)."""
    if m.arch == "clip":
        return "clip", [reason for bad, reason in (
            (pool != "tok", f"image pool {pool!r} (CLIPVisionModel pools its class token; its last_hidden_state "
                            "has no final LayerNorm)"),
            (m.image.posemb != "learn", f"image posemb {m.image.posemb!r}")) if bad]
    return "siglip", [reason for bad, reason in (
        (pool not in ("map", "none"), f"image pool {pool!r} (SiglipVisionModel has a MAP head or none)"),
        (m.image.posemb != "learn", f"image posemb {m.image.posemb!r} (SigLIP learns its position embeddings)"),
    ) if bad]


def image_pool(config: ml_collections.ConfigDict) -> str:
    """How the run's ViT pools: its model.image.pool in two towers; every token ("none") under a decoder."""
    return config.model.image.pool if config.task == "contrastive" else "none"


def _vision_config(m: ml_collections.ConfigDict, pool: str) -> dict[str, Any]:
    spec = vit_config(m, pool).encoder_spec()
    clip = m.arch == "clip"
    return {"hidden_size": spec.width, "intermediate_size": spec.mlp_dim, "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.num_heads, "image_size": m.image.image_size,
            "patch_size": parse_variant(m.image.variant)[1], "layer_norm_eps": spec.norm_eps,
            "hidden_act": "quick_gelu" if clip else "gelu_pytorch_tanh",
            **({} if clip else {"vision_use_head": pool == "map"})}


def _text_config(m: ml_collections.ConfigDict, token_ids: dict[str, int]) -> dict[str, Any]:
    spec = text_config(m).encoder_spec()
    clip = m.arch == "clip"
    return {"vocab_size": m.text.vocab_size, "hidden_size": spec.width, "intermediate_size": spec.mlp_dim,
            "num_hidden_layers": spec.depth, "num_attention_heads": spec.num_heads,
            "max_position_embeddings": m.text.max_len, "layer_norm_eps": spec.norm_eps,
            "hidden_act": "quick_gelu" if clip else "gelu_pytorch_tanh",
            **({} if clip else {"projection_size": m.embed_dim}), **token_ids}


def _rules(m: ml_collections.ConfigDict, kind: str, pool: str) -> list[Rule]:
    image = vit_config(m, pool).encoder_spec()
    if kind == "vision":  # SiglipVisionModel / CLIPVisionModel keys have no "vision_model." prefix
        rules = vit_rules("image_encoder", "vision_model", image, m.arch == "clip", pool == "map")
        return [dataclasses.replace(rule, hf=rule.hf.removeprefix("vision_model.")) for rule in rules]
    text = text_config(m).encoder_spec()
    rules = vit_rules("image_encoder", "vision_model", image, kind == "clip", kind == "siglip")
    rules += text_rules("text_encoder", "text_model", text)
    if kind == "siglip":
        return rules + linear_rules("text_proj", "text_model.head") + [Rule("logit_scale", "logit_scale", "unsqueeze")]
    return (rules + linear_rules("image_proj", "visual_projection", bias=False)
            + linear_rules("text_proj", "text_projection", bias=False) + [Rule("logit_scale", "logit_scale")])


def hf_config(config: ml_collections.ConfigDict, kind: str, token_ids: dict[str, int]):
    """The transformers config object of the export `kind` ("siglip", "clip" or "vision")."""
    import transformers

    m = config.model
    if kind == "vision":
        pool = image_pool(config)
        family, _ = vision_mismatches(m, pool)
        if family == "clip":
            return transformers.CLIPVisionConfig(**_vision_config(m, pool), architectures=["CLIPVisionModel"])
        return transformers.SiglipVisionConfig(**_vision_config(m, pool), architectures=["SiglipVisionModel"])
    if kind == "siglip":
        return transformers.SiglipConfig(text_config=_text_config(m, token_ids),
                                         vision_config=_vision_config(m, "map"), architectures=["SiglipModel"])
    return transformers.CLIPConfig(text_config=_text_config(m, token_ids), vision_config=_vision_config(m, "tok"),
                                   projection_dim=m.embed_dim, architectures=["CLIPModel"])


def export_tensors(params: dict, config: ml_collections.ConfigDict, kind: str) -> dict[str, np.ndarray]:
    """The transformers state dict of our parameters (any `scan`) for export `kind`."""
    m = config.model
    pool = image_pool(config)
    flat = {path: np.asarray(x) for path, x in leaves_with_path_str(weights.unstack_all(params, m.scan))}
    rules = _rules(m, kind, pool)
    head = _map_head_prefix(rules)
    in_proj = [f"{path}/{leaf}" for path in map_head_in_proj("image_encoder") for leaf in ("kernel", "bias")]
    if kind == "vision":  # the image tower alone: the rest of the model stays behind
        flat = {path: x for path, x in flat.items() if path.startswith("image_encoder/")}
    tensors = export(flat, rules, (*(in_proj if head else ()), "logit_bias"))
    if head:
        q, k, v = (flat[f"{path}/kernel"] for path in map_head_in_proj("image_encoder"))
        tensors[f"{head}attention.in_proj_weight"] = np.concatenate([weights.heads_in_to_torch(x) for x in (q, k, v)])
        tensors[f"{head}attention.in_proj_bias"] = np.concatenate(
            [np.asarray(flat[f"{path}/bias"]).reshape(-1) for path in map_head_in_proj("image_encoder")])
    if kind == "siglip":
        tensors["logit_bias"] = np.asarray(flat.get("logit_bias", np.zeros(())), np.float32).reshape(1)
    return tensors


def import_params(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict, kind: str,
                  shapes: dict[str, tuple[int, ...]], source: str) -> tuple[dict, weights.TensorReader]:
    """(our parameters, unstacked, as a flat {path: array}; the key-by-key account) from transformers tensors of
    export `kind`; `shapes`: our model's flat parameter shapes (layer stacks unstacked)."""
    m = config.model
    pool = image_pool(config)
    reader = weights.TensorReader(tensors, source)
    rules = _rules(m, kind, pool)
    flat = import_(reader, rules, shapes)
    head = _map_head_prefix(rules)
    if head:
        heads = vit_config(m, pool).encoder_spec().num_heads
        weight = reader.take(f"{head}attention.in_proj_weight")
        bias = reader.take(f"{head}attention.in_proj_bias")
        if weight is not None and bias is not None:
            for path, w, b in zip(map_head_in_proj("image_encoder"), np.split(weight, 3), np.split(bias, 3)):
                flat[f"{path}/kernel"] = weights.heads_in_from_torch(w, heads)
                flat[f"{path}/bias"] = b.reshape(heads, -1)
    if kind == "siglip":
        bias = reader.take("logit_bias")
        if bias is not None and "logit_bias" in shapes:
            flat["logit_bias"] = np.asarray(bias).reshape(shapes["logit_bias"])
    missing = sorted(set(shapes) - set(flat))
    if missing and not reader.missing and not reader.mismatched:
        raise ConfigError(f"{source}: this model's parameters {', '.join(missing[:3])} have no transformers key")
    return flat, reader


def _map_head_prefix(rules: list[Rule]) -> str:
    """The transformers prefix of the MAP head ("vision_model.head." or "head."), "" without one."""
    probe = [rule.hf for rule in rules if rule.ours == "image_encoder/map_head/probe"]
    return probe[0].removesuffix("probe") if probe else ""


def model_values(hf: Any) -> dict[str, Any]:
    """This project's config.model keys for a transformers SigLIP / CLIP config (two towers or vision only)."""
    vision = getattr(hf, "vision_config", hf)
    clip = "clip" in hf.model_type
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    values = {"arch": "clip" if clip else "big_vision", "image.variant": f"B/{patch}",
              "image.image_size": vision.image_size, "image.posemb": "learn",
              "image.pool": "tok" if clip else ("map" if getattr(vision, "vision_use_head", True) else "none")}
    values.update(_size_values("image", vision))
    if hasattr(hf, "text_config"):
        text = hf.text_config
        values.update({"text.vocab_size": text.vocab_size, "text.max_len": text.max_position_embeddings,
                       "text.pool": "eos" if clip else "last", "image_projection": clip,
                       "embed_dim": hf.projection_dim if clip else vision.hidden_size,
                       "loss": "softmax" if clip else "sigmoid", "text.size": "B"})
        if clip:
            values["text.eos_id"] = text.eos_token_id
        values.update(_size_values("text", text))
    return values


def _size_values(tower: str, hf_tower: Any) -> dict[str, int]:
    return {f"{tower}.width": hf_tower.hidden_size, f"{tower}.depth": hf_tower.num_hidden_layers,
            f"{tower}.mlp_dim": hf_tower.intermediate_size, f"{tower}.num_heads": hf_tower.num_attention_heads}

