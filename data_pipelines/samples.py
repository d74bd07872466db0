"""The raw sample every source yields, and the reasons a sample can be skipped.

A raw sample is a dict with
    "__key__":    str, unique within its source (the webdataset key, a file stem, a tfds id)
    "__source__": str, where it came from (shard path or URL, folder, CSV file, tfds name/split)
    "image":      bytes, the encoded image (JPEG, PNG, WebP; absent in a text-only source's samples)
    "caption":    str (may be absent for classification sets)
    "label":      int (optional: classification sets)
    "__dataset__": str, training pipelines only: the name of the mixture source it came from (SOURCE_NAME_KEY)
plus any further fields a source maps in (for example selected keys of a webdataset `.json` member).
Preprocessing ops turn raw samples into arrays; a sample they cannot use raises `SampleError(reason)`, one that
a `data.filters` rule drops raises `SampleFiltered(rule)`.
"""

from __future__ import annotations

# Every way a sample or a shard can be skipped; each is reported as the metric `data/skipped/<reason>`.
SKIP_REASONS = (
    "corrupt_image",      # image bytes that do not decode
    "no_image",           # a sample without an image member
    "no_caption",         # a sample without a caption, or with an empty one
    "duplicate_key",      # a key seen before in the same shard
    "truncated_tar",      # a shard that ends inside a member (the samples before the damage are kept)
    "unreadable_shard",   # a shard that cannot be opened or fails mid-read
    "stalled_shard",      # a shard whose reads stalled through every retry
    "missing_field",      # a sample without a field its task template or a data.filters rule needs
)
SHARD_REASONS = ("truncated_tar", "unreadable_shard", "stalled_shard")

# Events counted on samples that are still used (not skips, not in the skipped fraction): an op marks a sample
# by adding the name to the frozenset in sample[FLAGS_KEY]; preprocessing counts each name once per sample and
# drops the field before batching.
SAMPLE_FLAGS = (
    "truncated_captions",  # token ids cut to fit the text length (EOS kept last)
)
FLAGS_KEY = "__flags__"

# data.filters rules (data_pipelines/filters.py): a sample a rule drops is counted as `data/filtered/<rule>`; it is
# a deliberate choice, not a skip (not in the skipped fraction).
FILTER_RULES = ("similarity", "pwatermark", "punsafe", "image_size", "caption_length")
SOURCE_NAME_KEY = "__dataset__"


def flag(sample: dict, name: str) -> dict:
    """`sample` with `name` (one of SAMPLE_FLAGS) added to its flags."""
    if name not in SAMPLE_FLAGS:
        raise ValueError(f"unknown sample flag {name!r}")
    return {**sample, FLAGS_KEY: sample.get(FLAGS_KEY, frozenset()) | {name}}


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class SampleFiltered(Exception):
    """A sample that a data.filters rule drops; `rule` is one of FILTER_RULES."""

    def __init__(self, rule: str, message: str = ""):
        super().__init__(f"filtered by {rule}: {message}" if message else f"filtered by {rule}")
        self.rule = rule


class DataError(RuntimeError):
    """The input as a whole is unusable (too many skipped samples, no shards): stops the run."""
