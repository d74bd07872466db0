"""Our Gemma LM (models/gemma.py) <-> transformers' `gemma` / `gemma2` text models, and the table-driven tensor
mapping the PaliGemma export (hf/paligemma.py) shares.

Exact equivalences: Gemma 1 blocks (no post-norms, no softcaps, every layer global) are `gemma`; blocks with
post-norms are `gemma2` (softcaps optional, any local/global layer order as `layer_types`, query_pre_attn_scalar =
head_dim, one RoPE base). Both scale embeddings by sqrt(width), use RMSNorm x * (1 + w) (eps 1e-6), split-half
RoPE and tied output embeddings, as ours. transformers' sliding window and ours agree (a query at q sees keys
k > q - window); under PaliGemma's prefix-LM mask they agree while the bidirectional part (image + prefix) fits
in the window (transformers lets prefix tokens see each other past it, we do not). Refused with a one-line
ConfigError: Gemma 3 QK-norm, a local RoPE base different from the global one, and Gemma 1 blocks with softcaps
or local layers (gemma has neither, gemma2 always has post-norms).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from vlm_jax.config import ConfigError
from vlm_jax.hf.weights import (TensorReader, dense_to_torch, heads_in_from_torch, heads_in_to_torch,
                                heads_out_from_torch, heads_out_to_torch, stack_layers, unstack_layers)
from vlm_jax.models.gemma import EPS, SIZES, GemmaSpec

GEMMA_ACT = "gelu_pytorch_tanh"  # GeGLU with tanh GELU
# our block's norm -> transformers' name, per text model type (gemma's "post_attention_layernorm" is pre-MLP)
NORMS = {"gemma": {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"},
         "gemma2": {"pre_attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                    "pre_mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}}
SIZE_BASE = {"gemma": "gemma-2b", "gemma2": "gemma2-2b"}  # the named size an import's overrides start from


class Entry(NamedTuple):
    """One tensor: transformers' name (after a prefix), our path in the subtree, the two layout conversions and
    the torch shape expected on import."""

    name: str
    path: tuple[str, ...]
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]


def same(x: np.ndarray) -> np.ndarray:
    return np.asarray(x)


def transpose(x: np.ndarray) -> np.ndarray:
    """Dense kernel [in, out] <-> torch Linear weight [out, in] (dense_to_torch is its own inverse)."""
    return dense_to_torch(x)


def export_entries(tree: dict, entries: list[Entry], prefix: str) -> dict[str, np.ndarray]:
    """transformers' tensors (float32) of `entries` from our subtree."""
    out = {}
    for entry in entries:
        node = tree
        for key in entry.path:
            node = node[key]
        out[prefix + entry.name] = np.asarray(entry.to_torch(np.asarray(node, np.float32)), np.float32)
    return out


def import_entries(reader: TensorReader, entries: list[Entry], prefix: str) -> dict:
    """Our subtree of `entries` read from `reader` (float32); None where the reader records a problem."""
    tree: dict = {}
    for entry in entries:
        tensor = reader.take(prefix + entry.name, entry.shape)
        node = tree
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = None if tensor is None else entry.from_torch(np.asarray(tensor, np.float32))
    return tree


def export_layers(blocks: dict, scan: bool, entries: list[Entry], prefix: str) -> dict[str, np.ndarray]:
    """Every layer of a (scanned or listed) stack as `{prefix}{i}.{name}` tensors."""
    out = {}
    for index, layer in enumerate(unstack_layers(blocks, scan)):
        out.update(export_entries(layer, entries, f"{prefix}{index}."))
    return out


def import_layers(reader: TensorReader, depth: int, entries: list[Entry], prefix: str) -> list[dict]:
    return [import_entries(reader, entries, f"{prefix}{index}.") for index in range(depth)]


def model_type(spec: GemmaSpec) -> str:
    """"gemma" or "gemma2", the transformers text model that computes exactly what `spec` does; a one-line
    ConfigError naming the feature otherwise."""
    local = [i for i in range(spec.depth) if spec.is_local(i)]
    if spec.qk_norm:
        raise ConfigError("model.lm.qk_norm (Gemma 3 QK-norm) has no equivalent in transformers' gemma / gemma2 "
                          "text models (PaliGemma's); export with qk_norm False")
    if local and spec.rope_base_local != spec.rope_base:
        raise ConfigError(f"local layers with their own RoPE base (model.lm.rope_base_local {spec.rope_base_local} "
                          f"!= rope_base {spec.rope_base}, Gemma 3) have no equivalent in transformers' gemma2")
    if spec.post_norms:
        return "gemma2"
    extras = [name for name, on in (("attn_softcap", spec.attn_softcap), ("final_softcap", spec.final_softcap),
                                    ("window", local)) if on]
    if extras:
        raise ConfigError(f"Gemma blocks without post-norms but with model.lm.{', '.join(extras)} have no "
                          "transformers equivalent (gemma has no softcaps or local layers; gemma2 always has "
                          "post-norms)")
    return "gemma"


def block_entries(spec: GemmaSpec, kind: str) -> list[Entry]:
    width, mlp, heads, kv_heads, dim = spec.width, spec.mlp_dim, spec.num_heads, spec.num_kv_heads, spec.head_dim
    entries = [
        Entry("self_attn.q_proj.weight", ("attn", "query"), heads_in_to_torch,
              lambda w: heads_in_from_torch(w, heads), (heads * dim, width)),
        Entry("self_attn.k_proj.weight", ("attn", "key"), heads_in_to_torch,
              lambda w: heads_in_from_torch(w, kv_heads), (kv_heads * dim, width)),
        Entry("self_attn.v_proj.weight", ("attn", "value"), heads_in_to_torch,
              lambda w: heads_in_from_torch(w, kv_heads), (kv_heads * dim, width)),
        Entry("self_attn.o_proj.weight", ("attn", "output"), heads_out_to_torch,
              lambda w: heads_out_from_torch(w, heads), (width, heads * dim)),
        Entry("mlp.gate_proj.weight", ("mlp", "gate"), transpose, transpose, (mlp, width)),
        Entry("mlp.up_proj.weight", ("mlp", "up"), transpose, transpose, (mlp, width)),
        Entry("mlp.down_proj.weight", ("mlp", "down"), transpose, transpose, (width, mlp)),
    ]
    return entries + [Entry(f"{hf}.weight", (ours, "scale"), same, same, (width,)) for ours, hf in NORMS[kind].items()]


def top_entries(spec: GemmaSpec) -> list[Entry]:
    return [Entry("embed_tokens.weight", ("embedder", "embedding"), same, same, (spec.vocab_size, spec.width)),
            Entry("norm.weight", ("final_norm", "scale"), same, same, (spec.width,))]


def gemma_to_torch(lm: dict, spec: GemmaSpec, scan: bool, prefix: str) -> dict[str, np.ndarray]:
    """Our `lm` subtree as transformers' tensors under `prefix` ("model." in GemmaForCausalLM). The output
    projection is tied to the embedding, so no lm_head is written (as save_pretrained does)."""
    kind = model_type(spec)
    return {**export_entries(lm, top_entries(spec), prefix),
            **export_layers(lm["blocks"], scan, block_entries(spec, kind), f"{prefix}layers.")}


def gemma_text_config(spec: GemmaSpec, max_len: int, ids: dict[str, int]) -> dict[str, Any]:
    """transformers' text config (gemma or gemma2) of `spec`; `ids`: pad/bos/eos_token_id."""
    kind = model_type(spec)
    config = dict(model_type=kind, vocab_size=spec.vocab_size, hidden_size=spec.width,
                  intermediate_size=spec.mlp_dim, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, max_position_embeddings=max_len,
                  rms_norm_eps=EPS, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": spec.rope_base}, **ids)
    if kind == "gemma":
        return {**config, "hidden_act": GEMMA_ACT}
    layer_types = ["sliding_attention" if spec.is_local(i) else "full_attention" for i in range(spec.depth)]
    return {**config, "hidden_activation": GEMMA_ACT, "query_pre_attn_scalar": spec.head_dim,
            "attn_logit_softcapping": spec.attn_softcap, "final_logit_softcapping": spec.final_softcap,
            # transformers builds a sliding mask whenever sliding_window is set: without local layers it is unused
            "sliding_window": spec.window or max_len, "layer_types": layer_types}


def resolve_config(hf_config: dict, kinds: tuple[str, ...]) -> Any:
    """transformers' own config object of a config.json dict (its defaults filled in, legacy keys converted); a
    one-line ConfigError for another model_type."""
    from transformers import CONFIG_MAPPING  # the hf extra

    kind = hf_config.get("model_type")
    if kind not in kinds:
        raise ConfigError(f"config.json has model_type {kind!r}; expected one of {', '.join(kinds)}")
    return CONFIG_MAPPING[kind].from_dict(dict(hf_config))


def _pattern(local: list[bool]) -> str:
    """The shortest repeating L/G pattern of the layers' local flags."""
    layers = "".join("L" if flag else "G" for flag in local)
    return next(layers[:n] for n in range(1, len(layers) + 1) if (layers[:n] * len(layers))[:len(layers)] == layers)


def text_fields(text: Any) -> dict[str, Any]:
    """Our Gemma size fields (SIZES keys) of a resolved transformers gemma / gemma2 text config; a one-line
    ConfigError for what ours cannot compute exactly."""
    kind, rope = text.model_type, dict(text.rope_parameters or {})
    act = getattr(text, "hidden_activation", None) or text.hidden_act
    problems = [f"{name} {value!r}" for name, value, want in (
        ("hidden activation", act, GEMMA_ACT), ("rms_norm_eps", text.rms_norm_eps, EPS),
        ("attention_bias", text.attention_bias, False), ("rope_type", rope.get("rope_type", "default"), "default"),
    ) if value != want]
    if kind == "gemma2" and text.query_pre_attn_scalar != text.head_dim:
        problems.append(f"query_pre_attn_scalar {text.query_pre_attn_scalar} (ours scales by head_dim "
                        f"{text.head_dim})")
    if problems:
        raise ConfigError(f"this {kind} text model has no exact equivalent here: {'; '.join(problems)}")
    local = ([t == "sliding_attention" for t in text.layer_types] if kind == "gemma2"
             else [False] * text.num_hidden_layers)
    theta = float(rope.get("rope_theta", 10_000.0))
    return dict(width=text.hidden_size, depth=text.num_hidden_layers, mlp_dim=text.intermediate_size,
                num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim,
                vocab_size=text.vocab_size,
                attn_softcap=float(getattr(text, "attn_logit_softcapping", None) or 0.0),
                final_softcap=float(getattr(text, "final_logit_softcapping", None) or 0.0),
                post_norms=kind == "gemma2", qk_norm=False, window=text.sliding_window if any(local) else 0,
                layer_pattern=_pattern(local), rope_base=theta, rope_base_local=theta)


def lm_config_values(text: Any) -> dict[str, Any]:
    """Our config keys for a resolved transformers text config: model.lm.size and the fields that differ from
    it, model.lm.max_len and model.text.vocab_size."""
    fields, size = text_fields(text), SIZE_BASE[text.model_type]
    values = {f"model.lm.{key}": value for key, value in fields.items()
              if key != "vocab_size" and value != SIZES[size][key]}
    return {"model.lm.size": size, **values, "model.lm.max_len": text.max_position_embeddings,
            "model.text.vocab_size": fields["vocab_size"]}


def spec_of(text: Any, scan: bool) -> GemmaSpec:
    fields = text_fields(text)
    for key in ("attn_softcap", "final_softcap", "window"):
        fields[key] = fields[key] or None
    return GemmaSpec(**fields, scan=scan)


def gemma_from_torch(reader: TensorReader, text: Any, scan: bool, prefix: str, lm_head: str) -> dict:
    """Our `lm` subtree from transformers' tensors under `prefix`, None where the reader records a problem. An
    `lm_head` tensor, if present, must equal the embedding (ours is tied)."""
    spec = spec_of(text, scan)
    top = import_entries(reader, top_entries(spec), prefix)
    layers = import_layers(reader, spec.depth, block_entries(spec, text.model_type), f"{prefix}layers.")
    head = reader.take(lm_head, (spec.vocab_size, spec.width)) if lm_head in reader.tensors else None
    embedding = top["embedder"]["embedding"]
    if head is not None and embedding is not None and not np.array_equal(np.asarray(head, np.float32), embedding):
        raise ConfigError(f"{lm_head} differs from the input embedding: our Gemma ties its output projection")
    reader.check()
    return {**top, "blocks": stack_layers(layers, scan)}


def gemma_import(tensors: dict[str, np.ndarray], hf_config: dict, scan: bool
                 ) -> tuple[dict, dict[str, Any], TensorReader]:
    """A GemmaForCausalLM / Gemma2ForCausalLM folder's tensors and config.json as (our `lm` subtree, our config
    keys (model.lm.*, model.text.vocab_size), the key-by-key reader). Raises the reader's one-line ConfigError
    when a key is missing, mismatched or left over."""
    text = resolve_config(hf_config, ("gemma", "gemma2"))
    reader = TensorReader(tensors, f"{text.model_type} weights")
    lm = gemma_from_torch(reader, text, scan, "model.", "lm_head.weight")
    return lm, lm_config_values(text), reader
