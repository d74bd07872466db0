"""Config loading, command-line overrides and validation.

Every recipe in `configs/` starts from `base_config()`, which is locked: a recipe or an override that names
a key the base does not have, or gives a value of the wrong type, fails before anything compiles.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from typing import Any

import ml_collections
from etils import epath
from ml_collections import config_dict


class ConfigError(ValueError):
    """A bad config; the message is one line naming the key or file."""


# logical axis -> mesh axes; one table for the whole project.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("proj", "tensor"),
    ("layers", None),
    ("length", "sequence"),
    # activations (the residual stream and MLP hidden units inside the towers)
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
)

CHOICES = {
    "task": ("contrastive", "captioning", "coca", "vlm"),
    "model.caption.loss_reduction": ("example", "token"),
    "model.loss": ("sigmoid", "softmax"),
    "model.loss_impl": ("collective", "global"),
    "model.attention_impl": ("auto", "xla", "blockwise", "pallas", "splash", "cudnn"),
    "model.image.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.text.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.decoder.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.lm.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.vlm.projector": ("linear", "mlp"),
    "model.arch": ("big_vision", "clip"),
    "export_as": ("auto", "siglip", "clip", "paligemma", "vision"),
    "optim.moments_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "optim.name": ("adamw", "adafactor"),
    "optim.decay": ("cosine", "rsqrt", "linear", "constant"),
    "wandb.mode": ("online", "offline"),
}
REQUIRED = ("data.tokenizer",)
POSITIVE = ("total_steps", "batch_size", "microbatches", "log_every", "checkpoint_every", "keep_checkpoints",
            "model.embed_dim", "model.text.max_len", "model.image.image_size", "data.cycle_length",
            "data.shuffle_buffer", "data.worker_buffer_size", "data.read_timeout_s", "data.eval_batch_size")


def placeholder(kind: type) -> config_dict.FieldReference:
    return config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
    """Every key a recipe may set, with its type and default."""
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256
    # Gradient accumulation: the batch in this many pieces with embeddings cached, so the contrastive loss
    # still sees every negative of the full batch (vlm_jax/microbatch.py). Must divide the per-device batch.
    c.microbatches = 1
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_every = 0  # 0: evaluate at the end only.
    # Hugging Face export (README, "Hugging Face"; needs the hf extra) into WORKDIR/hf every N steps and at the
    # end (0: none; `python -m vlm_jax.export` exports any checkpoint), as export_as ("auto", "siglip", "clip",
    # "paligemma" or "vision").
    c.export_every = 0
    c.export_as = "auto"
    # Evaluators by name: {name: {"type": registered evaluator (default: the name), "data": eval split (default
    # data.eval_shards), "every": steps (default eval_every), ...its own settings}}; None: the task's defaults.
    # See vlm_jax/evaluators/registry.py.
    c.evals = placeholder(dict)
    # Bootstrapping (LiT, BLIP-2, PaliGemma stage 1): parameters copied from other workdirs' newest checkpoints
    # before the first step, {"<subtree of this model>": {"workdir": DIR, "params": "<subtree there>" (default:
    # the same path)}}, e.g. {"image_encoder": {"workdir": "demo_out/clip_tiny"}}. Freeze them with optim.freeze.
    c.init_from = placeholder(dict)
    # Weights & Biases (needs the wandb extra): the same metrics and the resolved config, from process 0, to
    # project `wandb.project` (None: off); the run id is kept in WORKDIR/wandb_run_id so a resume continues the
    # run. name defaults to the workdir's basename. See vlm_jax/wandb_writer.py.
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = placeholder(str)
    c.wandb.entity = placeholder(str)
    c.wandb.name = placeholder(str)
    c.wandb.group = placeholder(str)
    c.wandb.mode = "online"

    c.model = ml_collections.ConfigDict()
    c.model.loss = "sigmoid"
    # "collective": over data-parallel devices, SigLIP as a ppermute ring and CLIP from all-gathered embeddings
    # (shard_map; never B x B logits per device). "global": the plain loss, partitioned by XLA.
    c.model.loss_impl = "collective"
    c.model.embed_dim = 768
    # The image and text towers' conventions: "big_vision" (SigLIP: tanh GELU, LayerNorm eps 1e-6, biased
    # projections) or "clip" (OpenAI CLIP: quick GELU, eps 1e-5, a LayerNorm before the image encoder, no patch
    # bias, a causal text tower, bias-free projections). Pools stay model.image.pool / model.text.pool: CLIP is
    # "tok" and "eos". README, "Hugging Face" says which shapes export to which transformers class.
    c.model.arch = "big_vision"
    # False: the image embedding is the image tower's pooled output (SigLIP; model.embed_dim must equal its width).
    c.model.image_projection = True
    c.model.dtype = "float32"
    c.model.scan = False
    c.model.attention_impl = "auto"
    c.model.image = ml_collections.ConfigDict()
    c.model.image.variant = "B/16"
    c.model.image.image_size = 224
    c.model.image.pool = "map"
    c.model.image.posemb = "learn"
    # FLIP / open_clip patch dropout: in training each example keeps a random round((1 - p) * patches) of its
    # patch tokens (a class token always) after the position embedding, before the encoder blocks; evaluation and
    # inference keep every token. In [0, 1); not for task "vlm" (see model.image_token_dropout).
    c.model.image.patch_dropout = 0.0
    # Decoders (tasks "captioning", "vlm"): in training each image keeps a random round((1 - p) * tokens) of the
    # image encoder's output tokens. The captioner's decoder cross-attends to fewer tokens; the VLM's rows keep
    # their length and the dropped image positions are masked out of attention (no compute saved). In [0, 1).
    c.model.image_token_dropout = 0.0
    c.model.text = ml_collections.ConfigDict()
    c.model.text.size = "B"
    c.model.text.vocab_size = 32_000
    c.model.text.max_len = 64
    c.model.text.pool = "last"  # "last", "first", "mean" or "eos" (the first EOS token, with a causal tower)
    c.model.text.eos_id = 1  # the tokenizer's EOS id (pool "eos"); tokenizers trained here use 1
    # Generative tasks (captioning, coca): the text decoder. Its vocabulary and length are model.text's.
    c.model.decoder = ml_collections.ConfigDict()
    c.model.decoder.size = "B"
    c.model.decoder.zero_init_head = True  # CapPa zero-initialises the output projection
    c.model.caption = ml_collections.ConfigDict()
    # CapPa: this share of examples (per example, at random) predicts every token at once from [MASK] inputs with
    # full attention; 0 is plain autoregressive captioning. CapPa's paper uses 0.75.
    c.model.caption.masked_pred_prob = 0.0
    # Train steps before the parallel share starts: every row is autoregressive until this step, then
    # masked_pred_prob applies (0: from the first step, as in the paper).
    c.model.caption.masked_pred_start_step = 0
    # "example": per-example mean over its tokens, then the batch mean (big_vision); "token": mean over every
    # supervised token of the batch (open_clip).
    c.model.caption.loss_reduction = "example"
    c.model.caption.label_smoothing = 0.0
    # CoCa: attentional pooling queries for the decoder (the paper: 256; one more query gives the contrastive
    # embedding), unimodal text layers = model.text (with a CLS token), multimodal layers = model.decoder.
    c.model.coca = ml_collections.ConfigDict()
    c.model.coca.caption_queries = 256
    c.model.coca.contrastive_weight = 1.0
    c.model.coca.caption_weight = 2.0
    # Decoder-only VLM (task "vlm"): a Gemma-architecture LM (models/gemma.py) named by size ("tiny", "gemma-2b",
    # "gemma2-2b", "gemma3-1b") with optional overrides; its vocabulary is model.text.vocab_size.
    c.model.lm = ml_collections.ConfigDict()
    c.model.lm.size = "tiny"
    # Overrides of the named size (None: the size's own): 0 turns a softcap or the sliding window off;
    # layer_pattern repeats "L" (local, windowed) and "G" (global) layers over the depth.
    for key in ("num_kv_heads", "head_dim", "window"):
        c.model.lm[key] = placeholder(int)
    for key in ("attn_softcap", "final_softcap", "rope_base", "rope_base_local"):
        c.model.lm[key] = placeholder(float)
    for key in ("qk_norm", "post_norms"):
        c.model.lm[key] = placeholder(bool)
    c.model.lm.layer_pattern = placeholder(str)
    c.model.lm.max_len = 8192  # longest row (image tokens and text) the model is built for
    c.model.vlm = ml_collections.ConfigDict()
    c.model.vlm.projector = "linear"  # image tokens -> LM width: "linear" (PaliGemma) or "mlp" (LLaVA-1.5)
    # PRIOR token weighting (vlm_jax/tasks/prior.py): the workdir of a frozen text-only reference LM (a "vlm" run
    # on text-only data, same tokenizer); None: plain next-token prediction.
    c.model.vlm.prior_reference = placeholder(str)
    c.model.vlm.prior_alpha = 1.0
    for tower in (c.model.image, c.model.text, c.model.decoder, c.model.lm):  # Optional overrides of the size.
        for key in ("width", "depth", "mlp_dim", "num_heads"):
            tower[key] = placeholder(int)
        # Rematerialisation per block: none, full (recompute everything), dots (keep matmul outputs),
        # dots_no_batch (keep weight matmuls only, recompute attention scores).
        tower.remat = "none"

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0
    c.optim.decay = "cosine"
    c.optim.end_lr_factor = 0.0
    # First-moment decay: AdamW's (bias-corrected) mu; Adafactor's momentum (not bias-corrected; 0: none).
    c.optim.b1 = 0.9
    # Second-moment decay: AdamW's nu; for Adafactor the cap on its 1 - (step+1)^-0.8 decay (Zhai et al. 2021).
    c.optim.b2 = 0.95
    # dtype of the first moment (AdamW's mu / Adafactor's momentum); bfloat16 halves its memory. The second moment
    # stays float32. Adafactor without momentum (b1 = 0) refuses a non-default value.
    c.optim.moments_dtype = "float32"
    c.optim.eps = 1e-8  # AdamW's denominator epsilon; Adafactor refuses a non-default value
    # Decoupled: every step subtracts lr(step) * weight_decay * param (parameters not matched by no_decay), for
    # AdamW and Adafactor alike.
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 1.0
    c.optim.no_decay = r"(^|/)(bias|scale|embedding|posemb|cls_token|probe|logit_scale|logit_bias)$"
    c.optim.freeze = ""  # regex over parameter paths, e.g. LiT: r"^(image_encoder|image_proj)/"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.sequence = 1  # splits long sequences (the `length` logical axis)
    c.mesh.tensor = 1
    for axis in ("data", "fsdp", "sequence", "tensor"):  # across slices (multi-slice TPU / several GPU nodes)
        c.mesh[f"dcn_{axis}"] = 1
    c.mesh.max_replicated_fraction = 0.2  # with fsdp > 1: more parameter bytes replicated than this is an error
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.data = ml_collections.ConfigDict()
    # Training data: webdataset shards (brace range, glob, comma list, .txt list of URLs; local, gs://, s3://,
    # http(s)://), or a weighted mixture {name: {"shards": spec, "weight": w}} instead. With data.vlm a source may
    # add "text_only": True (its samples become text-only examples: no image, default task [BOS][text][EOS]) and
    # "tasks": {...} (its own task mixture, as data.vlm.tasks).
    c.data.train_shards = placeholder(str)
    c.data.mixture = placeholder(dict)
    c.data.tokenizer = placeholder(str)
    # Held-out split: webdataset shards, "tfds:NAME/SPLIT[@DATA_DIR]", "csv:FILE" or "folder:DIR".
    c.data.eval_shards = placeholder(str)
    c.data.classnames = placeholder(str)  # JSON list of class names for zero-shot classification.
    c.data.templates = placeholder(str)  # JSON list of prompt templates with one '{}'.
    # Preprocessing op specs (data_pipelines/ops.py); empty: derived from the model's image size and text length.
    c.data.pp_train = ""
    c.data.pp_eval = ""
    c.data.image_extensions = "jpg,jpeg,png,webp"  # tar members tried, in order, for the image
    c.data.caption_extension = "txt"
    c.data.cycle_length = 4        # shards read at once (interleaved) per worker
    c.data.shuffle_buffer = 1000   # window shuffle over raw samples
    c.data.num_epochs = placeholder(int)  # None: repeat forever
    # int, or "auto" (one per core). The sample order depends on it: a resume with another count is refused.
    c.data.num_workers = ml_collections.FieldReference("auto", field_type=object)
    c.data.worker_buffer_size = 2  # batches each worker prepares ahead
    c.data.max_skip_fraction = 0.01
    c.data.skip_check_after = 1000  # records read before the skip fraction is enforced
    c.data.read_timeout_s = 60.0
    c.data.read_retries = 3
    c.data.read_backoff_s = 1.0
    c.data.eval_batch_size = 256
    # Rules on the .json metadata img2dataset writes, for every task, e.g. {"similarity": {"min": 0.28},
    # "pwatermark": {"max": 0.8}, "punsafe": {"max": 0.5}, "image_size": {"min": 64} (shorter side of
    # original_width/original_height, else width/height), "caption_length": {"min": 1, "max": 200} (in words)}.
    # Bounds inclusive; a dropped sample counts as data/filtered/<rule>, not as a skip; a sample without the
    # metadata is skipped as missing_field. See data_pipelines/filters.py.
    c.data.filters = placeholder(dict)
    # Decoder-only VLM rows (task "vlm"; None for other tasks), a dict or ConfigDict; validation fills in the
    # defaults (data_pipelines/vlm_examples.py, packing.py for the row format):
    #   image_tokens  tokens per image (set by the recipe; the model checks it)
    #   text_len      text ids per example, BOS to EOS (longer text is cut, EOS kept: truncated_captions)
    #   tasks         {name: {"weight": w, "prefix": template, "suffix": template}}: each sample draws one by
    #                 weight; templates name fields in braces ({caption}: the .txt caption, other names: .json
    #                 fields; a constant prompt has none); a sample lacking a field is skipped (missing_field)
    #   separator     ";" (between prefix and suffix; the demo sentencepiece models drop "\n")
    #   lower         True: lower-case the text (as the tokenizers trained here expect)
    #   pack          False: one example per row of image_tokens + text_len positions; True: packed rows
    #   pack_images   4: images per packed row
    #   pack_length   positions per packed row (default pack_images * image_tokens + text_len)
    # data.pp_train is then the image preprocessing only (default: decode and square resize, uint8).
    c.data.vlm = ml_collections.FieldReference(None, field_type=object)
    c.lock()
    return c


def sibling_recipe(config_file: str, name: str, arg: str | None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the recipe `name` in the folder of `config_file` (a variant's `__file__`), so a variant
    overrides its base instead of copying it."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    module_spec = importlib.util.spec_from_file_location(f"_recipe_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path[:arg]`, calls its `get_config(arg)`, applies `key=value` overrides, validates."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (OSError, SyntaxError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except (AttributeError, TypeError, KeyError) as e:
        raise ConfigError(f"config file {path}: {describe_config_error(e)}") from e
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def describe_config_error(error: Exception) -> str:
    """One line from ml_collections' long messages."""
    message = str(error).strip("'\"")
    unknown = re.search(r'Key "([^"]+)" does not exist', message)
    if unknown:
        return f"unknown key {unknown.group(1)!r}"
    return message.splitlines()[0]


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies one `dotted.key=value` override, parsing the value by the key's type."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} must look like key=value")
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    expected = node.get_type(leaf)
    try:
        node[leaf] = parse_value(raw, expected)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {key!r} expects {expected.__name__}, got {raw!r}") from e


def parse_value(raw: str, expected: type) -> Any:
    if expected is str:
        return raw
    if expected is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    if raw.lower() == "none":
        return None
    if expected is object:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    value = ast.literal_eval(raw)
    if expected is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, expected):
        raise TypeError(raw)
    return value


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks choices, required fields and positive sizes; raises ConfigError naming the key."""
    flat = flatten(config)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key {key!r} is {flat[key]!r}; choose from {choices}")
    for key in REQUIRED:
        if flat[key] is None:
            raise ConfigError(f"config key {key!r} is required")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {flat[key]}")
    validate_token_dropout(flat)
    validate_data(config.data)
    if flat["optim.freeze"]:
        try:
            re.compile(flat["optim.freeze"])
        except re.error as e:
            raise ConfigError(f"config key 'optim.freeze' is not a valid regex: {e}") from e


TOKEN_DROPOUT_TASKS = ("captioning", "vlm")  # the tasks whose image tokens feed a decoder's attention


def validate_token_dropout(flat: dict[str, Any]) -> None:
    """Dropout rates in [0, 1); image-token dropout only where a decoder reads the image tokens."""
    for key in ("model.image.patch_dropout", "model.image_token_dropout"):
        if not 0 <= flat[key] < 1:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {flat[key]}")
    if flat["model.image_token_dropout"] > 0 and flat["task"] not in TOKEN_DROPOUT_TASKS:
        raise ConfigError(f"config key 'model.image_token_dropout' drops image tokens before a decoder: tasks "
                          f"{TOKEN_DROPOUT_TASKS} only, not {flat['task']!r} (model.image.patch_dropout drops them "
                          "before the image encoder's blocks)")


def validate_data(data: ml_collections.ConfigDict) -> None:
    if (data.train_shards is None) == (data.mixture is None):
        raise ConfigError("set exactly one of config keys 'data.train_shards' and 'data.mixture'")
    for name, source in (data.mixture or {}).items():
        if not isinstance(source, dict) or not {"shards", "weight"} <= set(source) <= MIXTURE_SOURCE_KEYS:
            raise ConfigError(f"data.mixture[{name!r}] must be {{'shards': spec, 'weight': number}} (with data.vlm "
                              "also 'text_only' and 'tasks')")
        if not isinstance(source["weight"], (int, float)) or source["weight"] <= 0:
            raise ConfigError(f"data.mixture[{name!r}] weight must be a positive number")
        if data.vlm is None and set(source) - {"shards", "weight"}:
            raise ConfigError(f"data.mixture[{name!r}]: 'text_only' and 'tasks' need data.vlm")
    validate_filters_and_vlm(data)
    workers = data.num_workers
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ConfigError(f"config key 'data.num_workers' must be 'auto' or an integer >= 0, got {workers!r}")
    if not 0 <= data.max_skip_fraction < 1:
        raise ConfigError("config key 'data.max_skip_fraction' must be in [0, 1)")
    if data.num_epochs is not None and data.num_epochs <= 0:
        raise ConfigError("config key 'data.num_epochs' must be positive (or None: repeat forever)")


MIXTURE_SOURCE_KEYS = {"shards", "weight", "text_only", "tasks"}


def validate_filters_and_vlm(data: ml_collections.ConfigDict) -> None:
    """Checks data.filters and data.vlm (one-line ConfigError) and fills data.vlm's defaults, as a ConfigDict."""
    from data_pipelines import filters, vlm_examples
    from data_pipelines.samples import DataError
    try:
        filters.check_filters(data.filters)
        if data.vlm is not None:
            vlm_examples.vlm_options(data.vlm, data.mixture)
            data.vlm = ml_collections.ConfigDict(vlm_examples.vlm_settings(data.vlm))
    except DataError as e:
        raise ConfigError(str(e)) from None


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(config: ml_collections.ConfigDict, path: epath.Path) -> None:
    epath.Path(path).write_text(config.to_json(indent=2))


def load_saved_config(path: epath.Path) -> ml_collections.ConfigDict:
    """Reads a config written by `save_config` back onto the base config (types restored)."""
    path = epath.Path(path)
    if not path.is_file():
        raise ConfigError(f"no saved config at {path}; was this workdir written by vlm_jax.train?")
    saved = json.loads(path.read_text())
    config = base_config()
    _assign_saved(config, saved, path)
    validate(config)
    return config


def _assign_saved(node: ml_collections.ConfigDict, saved: dict, path: str, prefix: str = "") -> None:
    for key, value in saved.items():
        if key not in node:
            raise ConfigError(f"saved config {path} has unknown key {prefix + key!r}")
        if isinstance(node[key], ml_collections.ConfigDict):
            _assign_saved(node[key], value, path, f"{prefix}{key}.")
        else:
            node[key] = to_tuples(value) if isinstance(node[key], tuple) else value


# Keys a resumed run may change: how the same computation is run, logged, checkpointed and evaluated. Any other
# change (the schedule, the optimizer, the model, the data stream) needs an explicit allowance.
RESUMABLE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "evals", "microbatches",
                  "export_every", "export_as", "wandb.",
                  "mesh.", "sharding_rules", "model.attention_impl", "model.loss_impl", "model.image.remat",
                  "model.text.remat", "model.decoder.remat", "model.lm.remat", "data.num_workers", "data.worker_buffer_size", "data.read_", "data.eval_",
                  "data.pp_eval", "data.classnames", "data.templates")


def resume_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every key whose value differs."""
    old, new = flatten(saved), flatten(config)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if to_tuples(old.get(key)) != to_tuples(new.get(key))}


def check_resume_changes(changes: dict[str, tuple], allowed: set[str], source: str) -> None:
    """Refuses, naming the first key, a change a resumed run may not make silently (see RESUMABLE_KEYS) unless
    it is in `allowed` (the trainer's --allow-change flag; "all" allows everything)."""
    if "all" in allowed:
        return
    for key, (old, new) in changes.items():
        if not key.startswith(RESUMABLE_KEYS) and key not in allowed:
            raise ConfigError(f"config key {key!r} is {new!r} but the run in {source} used {old!r}: resuming with it "
                              f"would change the schedule, the model or the data; pass --allow-change={key} to "
                              "resume anyway, or use a new workdir")


def to_tuples(value: Any) -> Any:
    return tuple(to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
