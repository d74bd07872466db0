"""Our Gemma LM (models/gemma.py) <-> transformers' `gemma` / `gemma2` text models (GemmaForCausalLM,
Gemma2ForCausalLM, and PaliGemma's language model), as a hf/towers.py rule table.

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

from typing import Any, Callable

import numpy as np
from flax import nnx

from vlm_jax.config import ConfigError
from vlm_jax.hf.towers import Rule, export, import_
from vlm_jax.hf.weights import TensorReader, stack_all, unstack_all
from vlm_jax.models.gemma import EPS, SIZES, GemmaSpec
from vlm_jax.pytree import leaves_with_path_str, map_with_path_str

GEMMA_ACT = "gelu_pytorch_tanh"  # GeGLU with tanh GELU
# our block's norm -> transformers' name, per text model type (gemma's "post_attention_layernorm" is pre-MLP)
NORMS = {"gemma": {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"},
         "gemma2": {"pre_attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                    "pre_mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}}
SIZE_BASE = {"gemma": "gemma-2b", "gemma2": "gemma2-2b"}  # the named size an import's overrides start from


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


def gemma_rules(ours: str, hf: str, spec: GemmaSpec) -> list[Rule]:
    """Our LM at path `ours` (layer stacks unstacked) <-> transformers' text model at prefix `hf`; the output
    projection is tied to the embedding, so there is no lm_head rule (save_pretrained writes none either)."""
    rules = [Rule(f"{ours}/embedder/embedding", f"{hf}.embed_tokens.weight"),
             Rule(f"{ours}/final_norm/scale", f"{hf}.norm.weight")]
    for i in range(spec.depth):
        block, layer = f"{ours}/blocks/{i}", f"{hf}.layers.{i}"
        rules += [Rule(f"{block}/attn/query", f"{layer}.self_attn.q_proj.weight", "heads_in", spec.num_heads),
                  Rule(f"{block}/attn/key", f"{layer}.self_attn.k_proj.weight", "heads_in", spec.num_kv_heads),
                  Rule(f"{block}/attn/value", f"{layer}.self_attn.v_proj.weight", "heads_in", spec.num_kv_heads),
                  Rule(f"{block}/attn/output", f"{layer}.self_attn.o_proj.weight", "heads_out", spec.num_heads)]
        rules += [Rule(f"{block}/mlp/{name}", f"{layer}.mlp.{name}_proj.weight", "dense")
                  for name in ("gate", "up", "down")]
        rules += [Rule(f"{block}/{name}/scale", f"{layer}.{hf_name}.weight")
                  for name, hf_name in NORMS[model_type(spec)].items()]
    return rules


def export_flat(params: dict, scan: bool, rules: list[Rule]) -> dict[str, np.ndarray]:
    """transformers' float32 tensors of `params` (layer stacks scanned or not) by `rules`; a one-line
    ConfigError naming any parameter the rules leave out, except `prior_lm` (PRIOR's frozen reference LM)."""
    flat = {path: np.asarray(x, np.float32) for path, x in leaves_with_path_str(unstack_all(params, scan))}
    return export(flat, rules, left_out=("prior_lm/",))


def abstract_params(build: Callable[[nnx.Rngs], nnx.Module]) -> dict:
    """The parameter shapes (jax.ShapeDtypeStruct) of the module `build` makes, as a pure dict."""
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param))


def import_tree(reader: TensorReader, rules: list[Rule], abstract: dict, scan: bool) -> dict:
    """Parameters shaped as the unscanned `abstract` tree, from `reader` by `rules`, as float32 with layer stacks
    scanned when `scan`. Raises the reader's one-line ConfigError when a key is missing, mismatched or left over."""
    shapes = {path: tuple(x.shape) for path, x in leaves_with_path_str(abstract)}
    flat = import_(reader, rules, shapes)
    reader.check()
    uncovered = sorted(set(shapes) - set(flat))
    if uncovered:
        raise ConfigError(f"{reader.source}: this model's parameters {', '.join(uncovered[:3])} have no "
                          "transformers key")
    return stack_all(map_with_path_str(lambda path, _: np.asarray(flat[path], np.float32), abstract), scan)


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
    """Our config.model keys for a resolved transformers text config: lm.size and the fields that differ from
    it, lm.max_len and text.vocab_size."""
    fields, size = text_fields(text), SIZE_BASE[text.model_type]
    values = {f"lm.{key}": value for key, value in fields.items() if key != "vocab_size" and value != SIZES[size][key]}
    return {"lm.size": size, **values, "lm.max_len": text.max_position_embeddings,
            "text.vocab_size": fields["vocab_size"]}


def check_tied(reader: TensorReader, lm_head: str, embedding: str) -> None:
    """Takes an `lm_head` tensor, if the folder has one: it must equal the embedding (ours is tied)."""
    if lm_head in reader.tensors and embedding in reader.tensors and not np.array_equal(
            reader.take(lm_head), reader.tensors[embedding]):
        raise ConfigError(f"{lm_head} differs from {embedding}: our Gemma ties its output projection")


def gemma_import(tensors: dict[str, np.ndarray], hf_config: dict, scan: bool
                 ) -> tuple[dict, dict[str, Any], TensorReader]:
    """A GemmaForCausalLM / Gemma2ForCausalLM folder's tensors and config.json as (our `lm` subtree, stacks
    scanned when `scan`; our config.model keys (lm.*, text.vocab_size); the key-by-key reader). Raises the
    reader's one-line ConfigError when a key is missing, mismatched or left over."""
    from vlm_jax.hf.load import configured
    from vlm_jax.models.gemma import GemmaLM
    from vlm_jax.tasks.towers import gemma_config

    text = resolve_config(hf_config, ("gemma", "gemma2"))
    values = lm_config_values(text)
    lm = gemma_config(configured(values, "vlm", False).model)
    reader = TensorReader(tensors, f"{text.model_type} weights")
    check_tied(reader, "lm_head.weight", "model.embed_tokens.weight")
    abstract = {"lm": abstract_params(lambda rngs: GemmaLM(lm, rngs))}
    params = import_tree(reader, gemma_rules("lm", "model", lm.spec()), abstract, scan)
    return params["lm"], values, reader
