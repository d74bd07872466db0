"""Held-out evaluation splits on the host: images, reference captions (tokens and strings), labels, class prompts."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np

from data_pipelines import eval_split, input_pipeline, vlm_examples
from vlm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class EvalData:
    """A held-out split on the host: images [N,H,W,3], captions [M,L] with their image indices text_image [M]
    (every reference caption), labels [N] (-1: none), prompts [C,T,L] (None: no class names), the raw reference
    strings per image (`references`, N lists) and a name per image (`keys`)."""

    images: np.ndarray
    texts: np.ndarray
    text_image: np.ndarray
    labels: np.ndarray
    prompts: np.ndarray | None
    references: list[list[str]] = dataclasses.field(default_factory=list)
    keys: list[str] = dataclasses.field(default_factory=list)
    fields: dict[str, list] = dataclasses.field(default_factory=dict)

    @property
    def has_captions(self) -> bool:
        """Caption evaluators (retrieval, perplexity, CIDEr) run only on a split with captions."""
        return len(self.texts) > 0

    @property
    def has_class_labels(self) -> bool:
        """Classification runs when every image has a label and there are class prompts."""
        return self.prompts is not None and bool(np.all(self.labels >= 0))


def eval_preprocessing(config: ml_collections.ConfigDict) -> str:
    """`config.data.pp_eval`, or default_pp_eval (transformers' pixels) with training's pixel value range."""
    data, image_size = config.data, config.model.image.image_size
    if data.vlm is not None:  # VLM rows are whole images resized (PaliGemma): evaluate them the same way
        default = vlm_examples.default_pp_vlm(image_size)
    else:
        default = input_pipeline.default_pp_train(image_size, config.model.text.max_len)
    return data.pp_eval or eval_split.default_pp_eval(image_size, data.pp_train or default, crop=data.vlm is None)


def load_eval_data(config: ml_collections.ConfigDict, source: str | None = None, *,
                   require_content: bool = True, fields: tuple[str, ...] = ()) -> EvalData | None:
    """The split `source` (default `config.data.eval_shards`; None when neither is set) preprocessed by
    eval_preprocessing, with class prompts from data.classnames / data.templates when set; a one-line
    ConfigError when its images do not fit the model or (with `require_content`) it has neither captions nor
    labels with class names."""
    data, image_size = config.data, config.model.image.image_size
    source = source or data.eval_shards
    if source is None:
        return None
    pp = eval_preprocessing(config)
    split = eval_split.load_eval_split(source, data.tokenizer, image_size=image_size,
                                       text_len=config.model.text.max_len, pp=pp, fields=fields)
    if split["image"].shape[1:] != (image_size, image_size, 3):
        raise ConfigError(f"data.pp_eval {pp!r} gives images of shape {split['image'].shape[1:]}, but "
                          f"model.image.image_size is {image_size}")
    prompts = None
    if data.classnames is not None:
        classnames, templates = read_json_list(data.classnames), read_json_list(data.templates)
        prompts = eval_split.tokenize_class_prompts(
            data.tokenizer, classnames, templates, config.model.text.max_len)
        if split["label"].max() >= len(classnames):
            raise ConfigError(f"{source} has label {split['label'].max()} but {data.classnames} names "
                              f"only {len(classnames)} classes")
    eval_data = EvalData(split["image"], split["text"], split["text_image"], split["label"], prompts,
                         split["captions"], split["key"], split["fields"])
    if require_content and not (eval_data.has_captions or eval_data.has_class_labels):
        raise ConfigError(f"nothing to evaluate in {source}: it has no captions (retrieval, captioning) and no "
                          f"labels for every image with data.classnames (classification)")
    return eval_data


def read_json_list(path: str | None) -> list[str]:
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"zero-shot class names / templates file not found: {path}")
    with open(path) as f:
        return json.load(f)
