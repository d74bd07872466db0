"""grain training pipelines over webdataset shards, and held-out splits loaded into memory.

    shard list --process split--> per-epoch shuffled shard order (repeated) --> interleave of cycle_length
    streaming shard readers --> [VLM: samples tagged with their source's name] --> [weighted mixture of sources]
    --> window shuffle of raw samples --> data.filters, preprocessing ops (bad samples counted)
    --> [VLM: examples laid out in rows, packed or one per row] --> batch --> worker processes (exit with their
    parent) --> worker count recorded in the state --> skip accounting

Every stage keeps its position in the iterator state, which the trainer saves in the model's checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import grain
from absl import flags

from data_pipelines import filters, ops, vlm_examples, workers
from data_pipelines.packing import RowIterDataset, row_layout
from data_pipelines.preprocess import PreprocessIterDataset, SkipAccountingIterDataset
from data_pipelines.samples import SOURCE_NAME_KEY, DataError
from data_pipelines.shard_io import ReadOptions
from data_pipelines.shuffle import WindowShuffleIterDataset
from data_pipelines.webdataset import FieldMap, TarShardDataset, expand_shards

MAX_AUTO_WORKERS = 32


@dataclasses.dataclass(frozen=True)
class TrainInput:
    """Everything the training pipeline needs; `from_config` fills it from `config.data`."""

    sources: Mapping[str, str]     # name -> shard spec
    weights: Mapping[str, float]   # name -> mixture weight
    pp: str                        # preprocessing op spec (with vlm: the image preprocessing only)
    tokenizer: str
    global_batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1000
    cycle_length: int = 4
    num_epochs: int | None = None
    num_workers: int | str = 0
    worker_buffer_size: int = 2
    max_skip_fraction: float = 0.01
    skip_check_after: int = 1000
    fields: FieldMap = FieldMap()
    read: ReadOptions = ReadOptions()
    filters: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)  # see filters.py
    vlm: vlm_examples.VlmOptions | None = None  # decoder-only VLM rows (vlm_examples.py, packing.py)
    image_size: int = 0                         # the VLM rows' image size


def default_pp_train(image_size: int, text_len: int) -> str:
    """Inception crop (mild, as for image-text pretraining) and sentencepiece ids. Images stay uint8: the
    model maps them to [-1, 1] on the device, so hosts move 4x fewer bytes."""
    return f"decode_rrc({image_size}, scale=(0.9, 1.0))|tokenize({text_len})|keep('image', 'text')"


def from_config(data, *, image_size: int, text_len: int, global_batch_size: int, seed: int) -> TrainInput:
    """TrainInput from a `config.data` ConfigDict (see vlm_jax/config.py for the keys)."""
    if data.mixture:
        sources = {name: source["shards"] for name, source in data.mixture.items()}
        weights = {name: float(source["weight"]) for name, source in data.mixture.items()}
    else:
        sources, weights = {"train": data.train_shards}, {"train": 1.0}
    vlm = vlm_examples.vlm_options(data.vlm, data.mixture) if data.vlm is not None else None
    default_pp = vlm_examples.default_pp_vlm(image_size) if vlm else default_pp_train(image_size, text_len)
    return TrainInput(
        sources=sources, weights=weights, pp=data.pp_train or default_pp, filters=dict(data.filters or {}),
        vlm=vlm, image_size=image_size,
        tokenizer=data.tokenizer, global_batch_size=global_batch_size, seed=seed,
        shuffle_buffer=data.shuffle_buffer, cycle_length=data.cycle_length, num_epochs=data.num_epochs,
        num_workers=data.num_workers, worker_buffer_size=data.worker_buffer_size,
        max_skip_fraction=data.max_skip_fraction, skip_check_after=data.skip_check_after,
        fields=FieldMap(image_extensions=tuple(e.strip() for e in data.image_extensions.split(",")),
                        caption_extension=data.caption_extension),
        read=ReadOptions(stall_timeout_s=data.read_timeout_s, retries=data.read_retries,
                         backoff_s=data.read_backoff_s))


def resolve_num_workers(num_workers: int | str) -> int:
    """'auto': one worker per core available to this process (up to MAX_AUTO_WORKERS)."""
    if num_workers == "auto":
        return min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS)
    return int(num_workers)


def local_shards(spec: str | Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's shards: every `process_count`-th, starting at `process_index` (no overlap)."""
    shards = expand_shards(spec)
    if len(shards) < process_count:
        raise DataError(f"{len(shards)} shards cannot be split across {process_count} processes: "
                        f"every process needs at least one shard of {spec!r}")
    return shards[process_index::process_count]


class _OpenShard:
    """Shard URL -> its dataset (a picklable callable, for grain worker processes)."""

    def __init__(self, fields: FieldMap, read: ReadOptions):
        self._fields, self._read = fields, read

    def __call__(self, url: str) -> TarShardDataset:
        return TarShardDataset(url, self._fields, self._read)


def shard_samples(spec: str | Sequence[str], options: TrainInput, *, process_index: int = 0,
                  process_count: int = 1, seed: int = 0, fields: FieldMap | None = None) -> grain.IterDataset:
    """Raw samples and skip records of one source, shard order reshuffled every epoch from `seed`."""
    urls = local_shards(spec, process_index, process_count)
    shards = grain.MapDataset.source(urls).shuffle(seed=seed).repeat(options.num_epochs)
    shards = shards.map(_OpenShard(fields or options.fields, options.read))
    return grain.experimental.InterleaveIterDataset(shards, cycle_length=options.cycle_length)


def source_fields(options: TrainInput, name: str) -> FieldMap:
    """The source's FieldMap: options.fields plus the .json fields filters and VLM templates read; a text-only
    source's samples need no image."""
    needed = filters.json_fields(options.filters) + (vlm_examples.json_fields(options.vlm) if options.vlm else ())
    text_only = options.vlm is not None and name in options.vlm.text_only
    return dataclasses.replace(options.fields, json_fields=tuple(dict.fromkeys(options.fields.json_fields + needed)),
                               require_image=options.fields.require_image and not text_only)


class _TagSource:
    """Record -> the record with SOURCE_NAME_KEY set (picklable, for grain worker processes)."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, record: dict) -> dict:
        record[SOURCE_NAME_KEY] = self._name
        return record


def mixed_samples(options: TrainInput, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Raw samples of every source, drawn in proportion to the weights (a single source: just its samples); with
    vlm, tagged with their source's name (SOURCE_NAME_KEY: text-only sources and per-source tasks)."""
    sources = {name: shard_samples(spec, options, process_index=process_index, process_count=process_count,
                                   seed=options.seed + i, fields=source_fields(options, name))
               for i, (name, spec) in enumerate(sorted(options.sources.items()))}
    if options.vlm:
        sources = {name: dataset.map(_TagSource(name)) for name, dataset in sources.items()}
    if len(sources) == 1:
        return next(iter(sources.values()))
    return grain.IterDataset.mix(sources, {name: options.weights[name] for name in sources})


def example_op(options: TrainInput) -> ops.Op:
    """Raw sample -> example: data.filters, then the pp ops (or, with vlm, one VLM example)."""
    if options.vlm:
        op = vlm_examples.example_op(options.vlm, options.pp, options.tokenizer)
    else:
        op = ops.build(options.pp, tokenizer=options.tokenizer)
    if options.filters:
        text_only = options.vlm.text_only if options.vlm else frozenset()
        op = filters.filtered(op, filters.Filters(options.filters, text_only))
    return op


def make_train_dataset(options: TrainInput, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
    """Per-process batches ({"image": [b, S, S, 3], "text": [b, L]} by default; with vlm, b rows as packing.py
    describes) with b = global / processes.

    Iterate it with `iter(...)`; the iterator's `skip_counts()` has the skip totals, and its get_state /
    set_state resume the exact sample sequence.
    """
    if options.global_batch_size % process_count:
        raise DataError(f"global batch size {options.global_batch_size} is not divisible by "
                        f"{process_count} processes")
    op = example_op(options)
    dataset = mixed_samples(options, process_index=process_index, process_count=process_count)
    if options.shuffle_buffer > 1:
        dataset = WindowShuffleIterDataset(dataset, options.shuffle_buffer, seed=options.seed)
    dataset = PreprocessIterDataset(dataset, op, seed=options.seed)
    if options.vlm:
        dataset = RowIterDataset(dataset, row_layout(options.vlm, options.image_size))
    dataset = dataset.batch(options.global_batch_size // process_count, drop_remainder=True)
    num_workers = resolve_num_workers(options.num_workers)
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=options.worker_buffer_size),
            worker_init_fn=workers.init_data_worker)
    dataset = workers.WorkerCountIterDataset(dataset, num_workers, options.num_workers)
    return SkipAccountingIterDataset(dataset, limit=options.max_skip_fraction,
                                     min_samples=options.skip_check_after)
