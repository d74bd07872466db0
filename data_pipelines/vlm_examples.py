"""Decoder-only VLM (PaliGemma-style prefix-LM) examples: `config.data.vlm` and the op that makes one example per
raw sample; data_pipelines/packing.py lays examples out in rows.

    data.vlm = {"image_tokens": 256, "text_len": 64, "separator": ";",
                "tasks": {"caption": {"weight": 2, "prefix": "caption", "suffix": "{caption}"},
                          "colour": {"weight": 1, "prefix": "what colour?", "suffix": "{colour}"}},
                "pack": True, "pack_images": 4}

Each sample draws one task by weight (with its preprocessing rng, so a restored iterator draws the same) and
becomes [image tokens][BOS][prefix ids][separator ids][suffix ids][EOS]: the image, the BOS, the prefix and the
separator are bidirectional, the suffix and EOS supervised. Templates name sample fields in braces: `{caption}` is
the `.txt` caption, any other name a `.json` field; a constant prompt has no braces. An empty prefix gives
[BOS][suffix][EOS]. A sample without a field its task needs is skipped ("missing_field"). Samples of a text-only
mixture source (`data.mixture[name]["text_only"]`) have no image tokens, and by default the task
TEXT_ONLY_TASKS ([BOS][text][EOS], the whole text supervised); `data.mixture[name]["tasks"]` overrides a
source's tasks.

Text is cut to `text_len` ids (BOS..EOS) keeping EOS last, counted "truncated_captions": the suffix's ids go
first, then (a field-driven prefix longer than the text length) the prefix's, keeping BOS and the separator.
A constant prompt that does not fit with EOS is a DataError when the pipeline is built.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping

import numpy as np

from data_pipelines import ops
from data_pipelines.samples import SOURCE_NAME_KEY, DataError, SampleError, flag

OPTIONAL_KEYS = {"separator": ";", "lower": True, "pack": False, "pack_length": 0, "pack_images": 4}  # defaults
REQUIRED_KEYS = ("image_tokens", "text_len", "tasks")
TEXT_OPS = ("tokenize", "caption_targets", "prefix_lm", "keep", "lower")  # the VLM text is built here


@dataclasses.dataclass(frozen=True)
class VlmTask:
    prefix: str
    suffix: str
    weight: float = 1.0


TEXT_ONLY_TASKS = {"text": VlmTask(prefix="", suffix="{caption}")}


@dataclasses.dataclass(frozen=True)
class VlmOptions:
    """`config.data.vlm` checked (vlm_settings), with the text-only sources and per-source tasks of
    `config.data.mixture`."""

    image_tokens: int
    text_len: int
    tasks: Mapping[str, VlmTask]
    separator: str = ";"
    lower: bool = True
    pack: bool = False
    pack_length: int = 0
    pack_images: int = 4
    text_only: frozenset[str] = frozenset()
    source_tasks: Mapping[str, Mapping[str, VlmTask]] = dataclasses.field(default_factory=dict)

    @property
    def row_length(self) -> int:
        """Tokens per row: one example's (image_tokens + text_len) unpacked, pack_length packed."""
        return self.pack_length if self.pack else self.image_tokens + self.text_len

    @property
    def images_per_row(self) -> int:
        return self.pack_images if self.pack else 1

    def tasks_of(self, source: str | None) -> Mapping[str, VlmTask]:
        return self.source_tasks.get(source, TEXT_ONLY_TASKS if source in self.text_only else self.tasks)


def template_fields(template: str) -> list[str]:
    """The field names of a template ("{caption} in {colour}" -> ["caption", "colour"])."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise DataError(f"data.vlm template {template!r}: {e}") from None
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        raise DataError(f"data.vlm template {template!r}: {bad[0]!r} is not a field name (write {{name}})")
    return names


def render(template: str, sample: dict) -> str:
    """The template filled with the sample's fields; SampleError("missing_field") for one it lacks."""
    values = {}
    for name in template_fields(template):
        if sample.get(name) is None:
            raise SampleError("missing_field", f"no field {name!r} for template {template!r}")
        values[name] = sample[name]
    return template.format(**values)


def _tasks(tasks, where: str) -> dict[str, VlmTask]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise DataError(f"{where} must be {{name: {{'weight': w, 'prefix': template, 'suffix': template}}}}")
    checked = {}
    for name, task in tasks.items():
        if not isinstance(task, Mapping) or not {"prefix", "suffix"} <= set(task) <= {"prefix", "suffix", "weight"}:
            raise DataError(f"{where}[{name!r}] must be {{'weight': w, 'prefix': template, 'suffix': template}}")
        weight = task.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"{where}[{name!r}] weight must be a positive number, got {weight!r}")
        if not all(isinstance(task[key], str) for key in ("prefix", "suffix")) or not task["suffix"]:
            raise DataError(f"{where}[{name!r}] prefix and suffix must be strings, the suffix not empty")
        for template in (task["prefix"], task["suffix"]):
            template_fields(template)  # raises for a malformed template
        checked[name] = VlmTask(task["prefix"], task["suffix"], float(weight))
    return checked


def _plain(value):
    """A ConfigDict as a dict (recipes may set either)."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def vlm_settings(vlm) -> dict:
    """`config.data.vlm` with the defaults (OPTIONAL_KEYS) filled in; pack_length 0 or absent becomes room for
    pack_images examples with images plus one full-length text: pack_images * image_tokens + text_len.
    DataError (one line) for an unknown or missing key or a bad size."""
    vlm = _plain(vlm)
    if not isinstance(vlm, Mapping):
        raise DataError(f"data.vlm must be a dict, got {vlm!r}")
    unknown = set(vlm) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
    missing = [key for key in REQUIRED_KEYS if key not in vlm]
    if unknown or missing:
        raise DataError(f"data.vlm: unknown key {sorted(unknown)[0]!r}" if unknown else
                        f"data.vlm needs {', '.join(repr(key) for key in missing)}")
    values = {**OPTIONAL_KEYS, **vlm}
    for key in ("image_tokens", "text_len", "pack_images", "pack_length"):
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < (key != "pack_length"):
            raise DataError(f"data.vlm.{key} must be an integer >= {int(key != 'pack_length')}, got {values[key]!r}")
    if not isinstance(values["separator"], str) or not all(isinstance(values[k], bool) for k in ("lower", "pack")):
        raise DataError("data.vlm.separator must be a string, data.vlm.lower and data.vlm.pack booleans")
    values["pack_length"] = values["pack_length"] or values["pack_images"] * values["image_tokens"] + values["text_len"]
    return values


def vlm_options(vlm, mixture: Mapping | None = None) -> VlmOptions:
    """VlmOptions from `config.data.vlm` and `config.data.mixture`; DataError (one line) for a bad setting."""
    values = vlm_settings(vlm)
    text_only, source_tasks = set(), {}
    for name, source in (mixture or {}).items():
        if source.get("text_only"):
            text_only.add(name)
        if "tasks" in source:
            source_tasks[name] = _tasks(_plain(source["tasks"]), f"data.mixture[{name!r}]['tasks']")
    options = VlmOptions(**{**values, "tasks": _tasks(values["tasks"], "data.vlm.tasks")},
                         text_only=frozenset(text_only), source_tasks=source_tasks)
    if options.pack and options.row_length < options.image_tokens + options.text_len:
        raise DataError(f"data.vlm.pack_length {options.pack_length} must hold one example: at least image_tokens "
                        f"+ text_len = {options.image_tokens + options.text_len}")
    return options


def json_fields(options: VlmOptions) -> tuple[str, ...]:
    """The .json fields the templates read (`caption` is the .txt caption)."""
    tasks = [*options.tasks.values(), *(t for tasks in options.source_tasks.values() for t in tasks.values())]
    if options.text_only:
        tasks += list(TEXT_ONLY_TASKS.values())
    fields = {name for task in tasks for template in (task.prefix, task.suffix) for name in template_fields(template)}
    return tuple(sorted(fields - {"caption"}))


def default_pp_vlm(image_size: int) -> str:
    """PaliGemma's image preprocessing: a square resize of the whole image (no crop), uint8."""
    return f"decode({image_size})|resize({image_size})"


def fit_text(head: list[int], sep: list[int], suffix: list[int], max_len: int) -> tuple[list[int], int, bool]:
    """(ids, prefix length, truncated): head + sep + suffix (BOS + prefix ids, separator ids, suffix ids + EOS)
    cut to max_len keeping BOS, the separator and EOS: the suffix's ids go first, then the prefix's.
    Needs max_len >= 2 + len(sep)."""
    over = len(head) + len(sep) + len(suffix) - max_len
    if over > 0:
        from_suffix = min(over, len(suffix) - 1)
        suffix = suffix[:len(suffix) - 1 - from_suffix] + suffix[-1:]
        head = head[:len(head) - (over - from_suffix)]
    return head + sep + suffix, len(head) + len(sep), over > 0


def _image_op(spec: str) -> ops.Op:
    text_ops = [name for name, _, _ in ops.parse_spec(spec) if name in TEXT_OPS]
    if text_ops:
        raise DataError(f"with data.vlm, data.pp_train {spec!r} is the image preprocessing: drop "
                        f"{', '.join(text_ops)} (data.vlm builds the text)")
    return ops.build(spec)


def _check_prompts_fit(options: VlmOptions, text: ops.PrefixLmText) -> None:
    if options.text_len < 2 + len(text.sep_ids):
        raise DataError(f"data.vlm.text_len {options.text_len} cannot hold BOS, the separator and EOS")
    for tasks in (options.tasks, *options.source_tasks.values()):
        for name, task in tasks.items():
            if not template_fields(task.prefix):
                head, sep = text.prefix(task.prefix)
                if len(head) + len(sep) + 1 > options.text_len:
                    raise DataError(f"data.vlm task {name!r}: prompt {task.prefix!r} takes {len(head) + len(sep)} "
                                    f"ids with BOS and separator; with EOS that is more than data.vlm.text_len "
                                    f"{options.text_len}")


def example_op(options: VlmOptions, image_spec: str, tokenizer: str) -> ops.Op:
    """Raw sample -> {"text": int32 [n] ids BOS..EOS, "prefix_len": bidirectional text ids, "image": uint8
    [H, W, 3] (not for text-only sources)}, flagged "truncated_captions" when cut."""
    text = ops.PrefixLmText(tokenizer, options.separator, options.lower, owner="data.vlm")
    _check_prompts_fit(options, text)
    image_op = _image_op(image_spec)
    draws: dict[str | None, tuple[list[VlmTask], np.ndarray]] = {}  # source -> its tasks and their probabilities

    def draw(source: str | None, rng: np.random.Generator) -> VlmTask:
        if source not in draws:
            tasks = list(options.tasks_of(source).values())
            weights = np.array([task.weight for task in tasks])
            draws[source] = tasks, weights / weights.sum()
        tasks, probabilities = draws[source]
        return tasks[rng.choice(len(tasks), p=probabilities)]

    def op(sample: dict, rng: np.random.Generator) -> dict:
        source = sample.get(SOURCE_NAME_KEY)
        task = draw(source, rng)
        head, sep = text.prefix(render(task.prefix, sample))
        ids, prefix_len, truncated = fit_text(head, sep, text.suffix(render(task.suffix, sample)), options.text_len)
        example = {"text": np.asarray(ids, np.int32), "prefix_len": prefix_len}
        if source not in options.text_only:
            example["image"] = image_op(sample, rng)["image"]
        return flag(example, "truncated_captions") if truncated else example
    return op
