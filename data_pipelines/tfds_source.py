"""Prepared tensorflow-datasets evaluation sets (ImageNet-style, COCO-captions-style) as raw samples.

Reads a dataset that is already prepared in ArrayRecord format (`download_and_prepare(file_format=
"array_record")`) through tfds's random-access data source, without TensorFlow and without ever
downloading. Images stay encoded (`tfds.decode.SkipDecoding`): the pipeline's ops decode them.
Each element is a raw sample in the schema of `data_pipelines/samples.py`:
    {"__key__": "<split>/<index>", "__source__": "tfds:<name>/<split>", "image": bytes,
     "caption": str, "captions": list[str], "label": int}   (caption/captions/label when the set has them)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np

AUTO = "auto"
# Text features looked for when caption_key="auto", in order; COCO captions nest them as captions/text.
CAPTION_CANDIDATES = ("captions", "caption", "texts", "text")


def tfds_source(name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
                caption_key: str | None = AUTO, label_key: str | None = AUTO) -> grain.MapDataset:
    """A grain MapDataset of raw samples from a prepared tfds dataset (never downloads).

    name: a tfds name, optionally with config and version ("coco_captions/2014", "imagenet2012:5.1.0").
    split: a tfds split spec ("validation", "test[:1000]").
    data_dir: where the dataset was prepared; None means tfds's default (TFDS_DATA_DIR or
        ~/tensorflow_datasets).
    image_key: the encoded image feature.
    caption_key: a text feature, "/"-separated for nested ones ("captions/text"); "auto" picks the
        first of CAPTION_CANDIDATES that exists (and its "text" sub-feature); None: no captions.
    label_key: an integer scalar feature; "auto" uses "label" when present; None: no labels.
    Raises a one-line ValueError when the dataset or split is not prepared in data_dir, or a key is wrong.
    """
    import tensorflow_datasets as tfds

    builder = _prepared_builder(name, split, data_dir)
    features = builder.info.features
    image_path = _resolve(features, image_key, "image_key", name)
    image_feature, image_in_sequence = _feature_at(features, image_path)
    if len(image_path) != 1 or image_in_sequence or not isinstance(image_feature, tfds.features.Image):
        raise ValueError(f"tfds {name}: image_key {image_key!r} is not a top-level Image feature")
    caption_path = _caption_path(features, caption_key, name)
    label_path = _label_path(features, label_key, name)
    # Skip decoding of every top-level image (ours stays bytes; the others would be decoded for nothing).
    decoders = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
                if isinstance(feature, tfds.features.Image)}
    try:
        source = builder.as_data_source(split=split, decoders=decoders)
    except (ValueError, KeyError) as error:  # a malformed or unknown split spec
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tfds {name}: split {split!r} unusable in {_data_dir_repr(data_dir)}: "
                         f"{first_line}") from None
    to_sample = _ToSample(source=f"tfds:{name}/{split}", split=split, image_path=image_path,
                          caption_path=caption_path, label_path=label_path)
    return grain.MapDataset.source(source).map_with_index(to_sample)


def _data_dir_repr(data_dir: str | None) -> str:
    if data_dir:
        return f"data_dir={data_dir!r}"
    from tensorflow_datasets.core import constants
    return f"data_dir={os.path.expanduser(constants.DATA_DIR)!r} (default)"


def _prepared_builder(name: str, split: str, data_dir: str | None) -> Any:
    """The builder of `name` prepared in data_dir in a random-access format; a one-line ValueError if none."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters, read_only_builder, registered

    builder = None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():  # the code's version is not there: any prepared version on disk?
            builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except (registered.DatasetNotFoundError, ValueError, FileNotFoundError):
        builder = None
    if builder is None or not builder.is_prepared():
        raise ValueError(f"tfds dataset {name!r} (split {split!r}) is not prepared in "
                         f"{_data_dir_repr(data_dir)}; prepare it there with "
                         f"download_and_prepare(file_format='array_record') first")
    formats = builder.info.available_file_formats() & file_adapters.FileFormat.with_random_access()
    if not formats:
        prepared_as = getattr(builder.info.file_format, "value", None)
        raise ValueError(f"tfds dataset {name!r} (split {split!r}) in {_data_dir_repr(data_dir)} is "
                         f"prepared as {prepared_as}, not array_record; re-prepare it with "
                         f"file_format='array_record'")
    return builder


def _feature_at(features: Any, path: tuple[str, ...]) -> tuple[Any, bool]:
    """The feature at a nested key path, and whether it lies inside a Sequence (so decodes to a list)."""
    import tensorflow_datasets as tfds

    feature, in_sequence = features, False
    for part in path:
        while isinstance(feature, tfds.features.Sequence):
            feature, in_sequence = feature.feature, True
        feature = feature[part]
    return feature, in_sequence


def _resolve(features: Any, key: str, argument: str, name: str) -> tuple[str, ...]:
    path = tuple(key.split("/"))
    try:
        _feature_at(features, path)
    except (KeyError, TypeError):
        raise ValueError(f"tfds {name}: {argument} {key!r} is not a feature (features: "
                         f"{sorted(features.keys())})") from None
    return path


def _is_text(feature: Any) -> bool:
    """A Text feature, or a Sequence of Text features."""
    import tensorflow_datasets as tfds

    while isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return isinstance(feature, tfds.features.Text)


def _caption_path(features: Any, caption_key: str | None, name: str) -> tuple[str, ...] | None:
    if caption_key is None:
        return None
    if caption_key != AUTO:
        path = _resolve(features, caption_key, "caption_key", name)
        if not _is_text(_feature_at(features, path)[0]):
            raise ValueError(f"tfds {name}: caption_key {caption_key!r} is not a text feature")
        return path
    for candidate in CAPTION_CANDIDATES:
        for path in ((candidate,), (candidate, "text")):
            try:
                if _is_text(_feature_at(features, path)[0]):
                    return path
            except (KeyError, TypeError):
                continue
    return None


def _label_path(features: Any, label_key: str | None, name: str) -> tuple[str, ...] | None:
    if label_key is None or (label_key == AUTO and "label" not in features.keys()):
        return None
    key = "label" if label_key == AUTO else label_key
    path = _resolve(features, key, "label_key", name)
    feature, in_sequence = _feature_at(features, path)
    if in_sequence or tuple(feature.shape) != () or not np.issubdtype(np.dtype(feature.np_dtype), np.integer):
        raise ValueError(f"tfds {name}: label_key {key!r} is not an integer scalar feature")
    return path


def _get(example: dict, path: tuple[str, ...]) -> Any:
    value = example
    for part in path:
        value = value[part]
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _ToSample:
    """Decoded tfds example (with index) -> raw sample; a picklable class so grain workers can use it."""

    source: str
    split: str
    image_path: tuple[str, ...]
    caption_path: tuple[str, ...] | None
    label_path: tuple[str, ...] | None

    def __call__(self, index: int, example: dict) -> dict:
        sample = {"__key__": f"{self.split}/{index}", "__source__": self.source,
                  "image": bytes(_get(example, self.image_path))}
        if self.caption_path is not None:
            value = _get(example, self.caption_path)
            if isinstance(value, (bytes, str)):
                sample["caption"] = _text(value)
            else:
                captions = [_text(text) for text in value]
                sample["captions"] = captions
                if captions:
                    sample["caption"] = captions[0]
        if self.label_path is not None:
            sample["label"] = int(_get(example, self.label_path))
        return sample
