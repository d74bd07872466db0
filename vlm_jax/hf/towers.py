"""Name-and-layout tables between this project's ViT / text towers and transformers' SigLIP and CLIP towers.

A `Rule` pairs one of our parameter paths (layer stacks unstacked: ".../blocks/3/...") with one transformers key
and the layout change between them. The same table drives export and import, so the two are inverse by
construction and a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from vlm_jax.config import ConfigError
from vlm_jax.hf import weights
from vlm_jax.models.layers import EncoderSpec


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    layout: str = "same"  # a key of LAYOUTS
    heads: int = 0  # per-head layouts: the number of heads


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).reshape(-1)


# layout: (ours -> transformers, (transformers, heads, our shape) -> ours)
LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (np.asarray, lambda t, heads, shape: np.asarray(t).reshape(shape)),
    "dense": (weights.dense_to_torch, lambda t, heads, shape: weights.dense_to_torch(t)),
    "heads_in": (weights.heads_in_to_torch, lambda t, heads, shape: weights.heads_in_from_torch(t, heads)),
    "heads_out": (weights.heads_out_to_torch, lambda t, heads, shape: weights.heads_out_from_torch(t, heads)),
    "heads_bias": (_flat, lambda t, heads, shape: np.asarray(t).reshape(heads, -1)),
    "conv": (weights.conv_to_torch, lambda t, heads, shape: weights.conv_from_torch(t)),
    "unsqueeze": (lambda x: np.asarray(x)[None], lambda t, heads, shape: np.asarray(t).reshape(shape)),
}


def layer_norm_rules(ours: str, hf: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", f"{hf}.weight"), Rule(f"{ours}/bias", f"{hf}.bias")]


def linear_rules(ours: str, hf: str, bias: bool = True) -> list[Rule]:
    return [Rule(f"{ours}/kernel", f"{hf}.weight", "dense")] + ([Rule(f"{ours}/bias", f"{hf}.bias")] if bias else [])


def encoder_layer_rules(ours: str, hf: str, heads: int) -> list[Rule]:
    """One pre-LN block (SigLIP and CLIP name them alike)."""
    rules = layer_norm_rules(f"{ours}/ln1", f"{hf}.layer_norm1") + layer_norm_rules(f"{ours}/ln2", f"{hf}.layer_norm2")
    for mine, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += [Rule(f"{ours}/attn/{mine}/kernel", f"{hf}.self_attn.{theirs}.weight", "heads_in", heads),
                  Rule(f"{ours}/attn/{mine}/bias", f"{hf}.self_attn.{theirs}.bias", "heads_bias", heads)]
    rules += [Rule(f"{ours}/attn/out/kernel", f"{hf}.self_attn.out_proj.weight", "heads_out", heads),
              Rule(f"{ours}/attn/out/bias", f"{hf}.self_attn.out_proj.bias")]
    return rules + linear_rules(f"{ours}/mlp/fc1", f"{hf}.mlp.fc1") + linear_rules(f"{ours}/mlp/fc2", f"{hf}.mlp.fc2")


def encoder_rules(ours: str, hf: str, spec: EncoderSpec) -> list[Rule]:
    """Every block of an Encoder; its final LayerNorm is left to the caller (named differently per tower)."""
    return [rule for i in range(spec.depth)
            for rule in encoder_layer_rules(f"{ours}/encoder/blocks/{i}", f"{hf}.encoder.layers.{i}", spec.num_heads)]


def vit_rules(ours: str, hf: str, spec: EncoderSpec, clip: bool, map_head: bool) -> list[Rule]:
    """A ViT as transformers' SiglipVisionTransformer (`clip` False) or CLIPVisionTransformer; `map_head`: with
    SigLIP's attention-pooling head."""
    rules = [Rule(f"{ours}/patch_embed/kernel", f"{hf}.embeddings.patch_embedding.weight", "conv"),
             Rule(f"{ours}/posemb", f"{hf}.embeddings.position_embedding.weight")]
    if clip:
        rules += [Rule(f"{ours}/cls_token", f"{hf}.embeddings.class_embedding")]
        rules += layer_norm_rules(f"{ours}/ln_pre", f"{hf}.pre_layrnorm")
    else:
        rules += [Rule(f"{ours}/patch_embed/bias", f"{hf}.embeddings.patch_embedding.bias")]
    rules += encoder_rules(ours, hf, spec) + layer_norm_rules(f"{ours}/encoder/ln_final", f"{hf}.post_layernorm")
    if map_head:
        head = f"{hf}.head"
        rules += [Rule(f"{ours}/map_head/probe", f"{head}.probe", "unsqueeze")]  # [1, D] here, [1, 1, D] there
        rules += [Rule(f"{ours}/map_head/attn/out/kernel", f"{head}.attention.out_proj.weight", "heads_out",
                       spec.num_heads), Rule(f"{ours}/map_head/attn/out/bias", f"{head}.attention.out_proj.bias")]
        rules += layer_norm_rules(f"{ours}/map_head/ln", f"{head}.layernorm")
        rules += linear_rules(f"{ours}/map_head/mlp/fc1", f"{head}.mlp.fc1")
        rules += linear_rules(f"{ours}/map_head/mlp/fc2", f"{head}.mlp.fc2")
    return rules


def text_rules(ours: str, hf: str, spec: EncoderSpec) -> list[Rule]:
    """A text encoder as transformers' SiglipTextTransformer / CLIPTextTransformer (without the SigLIP head)."""
    return ([Rule(f"{ours}/token_embed/embedding", f"{hf}.embeddings.token_embedding.weight"),
             Rule(f"{ours}/posemb", f"{hf}.embeddings.position_embedding.weight")]
            + encoder_rules(ours, hf, spec) + layer_norm_rules(f"{ours}/encoder/ln_final", f"{hf}.final_layer_norm"))


def map_head_in_proj(ours: str) -> tuple[str, str, str]:
    """Our paths of the MAP head's query, key and value kernels (transformers stacks them in one in_proj)."""
    return tuple(f"{ours}/map_head/attn/{name}" for name in ("query", "key", "value"))


def export(flat: dict[str, np.ndarray], rules: list[Rule], elsewhere: tuple[str, ...] = (),
           left_out: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """transformers tensors from our flat {path: array} by `rules`; a one-line ConfigError naming any parameter
    that neither a rule, nor `elsewhere` (paths the caller converts itself), nor a `left_out` prefix covers: an
    export never drops weights silently."""
    covered = {rule.ours for rule in rules} | set(elsewhere)
    left = sorted(path for path in set(flat) - covered if not path.startswith(left_out))
    if left:
        raise ConfigError(f"parameters with no transformers key: {', '.join(left[:3])}"
                          + (f" and {len(left) - 3} more" if len(left) > 3 else ""))
    return {rule.hf: LAYOUTS[rule.layout][0](flat[rule.ours]) for rule in rules}


def import_(reader: weights.TensorReader, rules: list[Rule], shapes: dict[str, tuple[int, ...]]
            ) -> dict[str, np.ndarray]:
    """Our flat {path: array} from transformers tensors by `rules`; `shapes` are our parameters' shapes (absent or
    mis-shaped keys are recorded by the reader)."""
    flat = {}
    for rule in rules:
        tensor = reader.take(rule.hf)
        if tensor is None:
            continue
        try:
            value = LAYOUTS[rule.layout][1](tensor, rule.heads, shapes[rule.ours])
        except ValueError:
            value = None
        if value is None or value.shape != tuple(shapes[rule.ours]):
            reader.loaded.remove(rule.hf)
            reader.mismatched.append(f"{rule.hf}: {tuple(tensor.shape)} in the folder, does not fit "
                                     f"{rule.ours} {tuple(shapes[rule.ours])}")
            continue
        flat[rule.ours] = value
    return flat
