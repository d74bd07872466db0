"""Held-out evaluation sets from any supported source, as one sequence of raw samples (see samples.py)."""

from __future__ import annotations

from typing import Iterator, Sequence

from data_pipelines.webdataset import FieldMap, expand_shards, read_shard

# Eval tars may be captioned (retrieval) or labelled only (classification: the label in {key}.json).
EVAL_FIELDS = FieldMap(require_caption=False, json_fields=("label",))


def _tar_records(urls: Sequence[str], json_fields: Sequence[str] = ()) -> Iterator[dict]:
    fields = FieldMap(require_caption=False, json_fields=EVAL_FIELDS.json_fields + tuple(json_fields))
    for url in urls:
        yield from read_shard(url, fields)


def raw_eval_samples(source: str, json_fields: Sequence[str] = ()) -> list[dict]:
    """Raw samples (and skip records) of `source`: a shard spec, "tfds:NAME/SPLIT[@DATA_DIR]",
    "csv:FILE" or "folder:DIR"; shard samples also carry these keys of their `.json` (e.g. a question's
    answer)."""
    kind, _, rest = source.partition(":")
    if kind == "tfds":
        from data_pipelines.tfds_source import tfds_source
        name_split, _, data_dir = rest.partition("@")
        name, _, split = name_split.partition("/")
        if not split:
            raise ValueError(f"tfds source {source!r} must look like tfds:NAME/SPLIT[@DATA_DIR]")
        return list(tfds_source(name, split, data_dir or None))
    if kind == "csv":
        from data_pipelines.folder_source import csv_samples
        return list(csv_samples(rest))
    if kind == "folder":
        from data_pipelines.folder_source import folder_samples
        return list(folder_samples(rest))
    return list(_tar_records(expand_shards(source), json_fields))
