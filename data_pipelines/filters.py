"""Data-level sample filters declared in `config.data.filters`, on the metadata img2dataset writes to `{key}.json`.

    {"similarity": {"min": 0.28}, "pwatermark": {"max": 0.8}, "punsafe": {"max": 0.5},
     "image_size": {"min": 64}, "caption_length": {"min": 1, "max": 200}}

Bounds are inclusive: a sample is kept when min <= value <= max. The rules (FILTER_RULES):
    similarity, pwatermark, punsafe  the `.json` field of that name (LAION's CLIP similarity, watermark and unsafe
                                     probabilities, saved by img2dataset's --save_additional_columns)
    image_size                       the shorter side in pixels of the image img2dataset downloaded: its
                                     `original_width` / `original_height` (before img2dataset's resize), else
                                     `width` / `height`
    caption_length                   the caption's length in words (whitespace-separated)
A dropped sample raises SampleFiltered and is counted as `data/filtered/<rule>` (under the first rule it fails, in
FILTER_RULES order), not as a skip. A sample without the metadata a rule needs (or with a null or non-numeric value)
is skipped and counted as `missing_field`, so a rule on metadata the shards lack stops the run at
data.max_skip_fraction instead of passing everything. Image rules do not apply to text-only sources' samples.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from data_pipelines.samples import FILTER_RULES, SOURCE_NAME_KEY, DataError, SampleError, SampleFiltered

# Rule -> the .json fields it reads (copied into raw samples; caption_length reads the .txt caption).
RULE_FIELDS = {"similarity": ("similarity",), "pwatermark": ("pwatermark",), "punsafe": ("punsafe",),
               "image_size": ("original_width", "original_height", "width", "height"), "caption_length": ()}
TEXT_RULES = ("caption_length",)  # the rules that also apply to text-only samples


def _number(sample: dict, field: str) -> float:
    value = sample.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SampleError("missing_field", f"no numeric .json field {field!r}")
    return float(value)


def rule_value(rule: str, sample: dict) -> float:
    """The quantity `rule` bounds; SampleError("missing_field") when the sample lacks it."""
    if rule == "image_size":
        names = ("original_width", "original_height") if "original_width" in sample else ("width", "height")
        return min(_number(sample, name) for name in names)
    if rule == "caption_length":
        if "caption" not in sample:
            raise SampleError("missing_field", "no caption")
        return float(len(sample["caption"].split()))
    return _number(sample, rule)


def check_filters(filters: Mapping | None) -> None:
    """DataError (one line) for an unknown rule or bounds other than {"min": number, "max": number}."""
    for rule, bounds in (filters or {}).items():
        if rule not in FILTER_RULES:
            raise DataError(f"unknown data.filters rule {rule!r}; known: {', '.join(FILTER_RULES)}")
        if (not isinstance(bounds, Mapping) or not bounds or set(bounds) - {"min", "max"}
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds.values())):
            raise DataError(f"data.filters[{rule!r}] must be {{'min': number, 'max': number}} (either or both), "
                            f"got {bounds!r}")


def json_fields(filters: Mapping | None) -> tuple[str, ...]:
    """The .json fields the rules read."""
    return tuple(field for rule in (filters or {}) for field in RULE_FIELDS[rule])


class Filters:
    """Raises SampleFiltered(rule) for a sample outside a rule's bounds; text-only sources' samples are checked
    by TEXT_RULES only."""

    def __init__(self, filters: Mapping, text_only: frozenset[str] = frozenset()):
        check_filters(filters)
        self._rules = [(rule, filters[rule].get("min", -np.inf), filters[rule].get("max", np.inf))
                       for rule in FILTER_RULES if rule in filters]
        self._text_only = text_only

    def __call__(self, sample: dict) -> None:
        text_only = sample.get(SOURCE_NAME_KEY) in self._text_only
        for rule, low, high in self._rules:
            if text_only and rule not in TEXT_RULES:
                continue
            value = rule_value(rule, sample)
            if not low <= value <= high:
                raise SampleFiltered(rule, f"{value:g} outside [{low:g}, {high:g}]")


def filtered(op: Callable, filters: Filters) -> Callable:
    """`op` run only on the samples `filters` keeps."""
    def run(sample: dict, rng: np.random.Generator) -> dict:
        filters(sample)
        return op(sample, rng)
    return run
