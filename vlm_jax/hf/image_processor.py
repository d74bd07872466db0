"""The transformers image processor config (`preprocessor_config.json`) of a model's evaluation preprocessing.

The geometry and value range follow `vlm_jax.evaluators.data.eval_preprocessing(config)`, which must decode at
full size and resize with Pillow's bicubic, as transformers does (the default data.pp_eval):
  decode|resize_small(S, method='bicubic')|center_crop(C) -> short side to S (long side floored), centre crop C
  decode|resize_small(S, method='bicubic')                -> short side to S, no crop
  decode|resize(S, method='bicubic')                      -> S x S, no crop (PaliGemma)
then uint8 -> [-1, 1] (the model's own mapping), or the spec's value_range(low, high) / normalize(mean, std).
Those give transformers' pixels exactly (tests/test_hf_image_processor.py). Other specs are refused: a JPEG
decoded at a reduced DCT scale (decode(N), decode_center_crop) or OpenCV's resize (method 'linear'), and the crop
taken before the resize, move pixels by up to 0.9 in [-1, 1] on real-size JPEGs.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import ml_collections

from data_pipelines import ops
from vlm_jax.config import ConfigError
from vlm_jax.evaluators.data import eval_preprocessing

PROCESSOR_TYPES = {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor"}
PIL_BICUBIC = 3  # PILImageResampling.BICUBIC
NAME = "preprocessor_config.json"


def _ops(pp: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, every argument by name with defaults) of each op of a spec."""
    parsed = []
    for name, args, kwargs in ops.parse_spec(pp):
        bound = inspect.signature(ops.OPS[name]).bind(*args, **kwargs)
        bound.apply_defaults()
        parsed.append((name, dict(bound.arguments)))
    return parsed


def _geometry(steps: list[tuple[str, dict[str, Any]]], pp: str) -> dict[str, Any]:
    names = tuple(name for name, _ in steps)
    exact = (names[:1] == ("decode",) and not steps[0][1]["min_size"] and len(steps) > 1
             and steps[1][1].get("method") == "bicubic")
    if exact and names[1:] == ("resize",):
        size = steps[1][1]["size"]
        return {"size": {"height": size, "width": size}, "do_center_crop": False}
    if exact and names[1:] in (("resize_small",), ("resize_small", "center_crop")):
        crop = {"do_center_crop": False}
        if len(steps) == 3:
            side = steps[2][1]["size"]
            crop = {"do_center_crop": True, "crop_size": {"height": side, "width": side}}
        return {"size": {"shortest_edge": steps[1][1]["size"]}, **crop}
    raise ConfigError(f"evaluation preprocessing {pp!r} has no transformers image processor equivalent: export "
                      "supports decode|resize(S, method='bicubic') and decode|resize_small(S, method='bicubic')"
                      "[|center_crop(C)] (full decode, Pillow bicubic; the default data.pp_eval) followed by at "
                      "most one value_range or normalize")


def _values(steps: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """image_mean / image_std (on pixels rescaled to [0, 1]) giving the model's input values."""
    if not steps:  # uint8: the model maps it to [-1, 1]
        return {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    name, arguments = steps[0]
    if name == "normalize":
        return {"image_mean": list(arguments["mean"]), "image_std": list(arguments["std"])}
    low, high = arguments["low"], arguments["high"]  # x / 255 * (high - low) + low
    return {"image_mean": [-low / (high - low)] * 3, "image_std": [1 / (high - low)] * 3}


def image_processor_config(pp: str, kind: str = "siglip") -> dict[str, Any]:
    """The preprocessor_config.json contents for the evaluation spec `pp` and the transformers model family
    `kind` ("siglip" or "clip"); a one-line ConfigError for a spec transformers cannot express."""
    if kind not in PROCESSOR_TYPES:
        raise ConfigError(f"image processor kind {kind!r}: expected one of {', '.join(PROCESSOR_TYPES)}")
    steps = _ops(pp)
    values = [step for step in steps if step[0] in ("value_range", "normalize")]
    if len(values) > 1 or (values and steps[-1] is not values[0]):
        raise ConfigError(f"evaluation preprocessing {pp!r}: transformers applies one value mapping, last")
    return {"image_processor_type": PROCESSOR_TYPES[kind], "do_convert_rgb": True, "do_resize": True,
            "resample": PIL_BICUBIC, **_geometry(steps[:len(steps) - len(values)], pp),
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, **_values(values)}


def write_image_processor(config: ml_collections.ConfigDict, out_dir: str | os.PathLike, kind: str = "siglip",
                          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes `out_dir/preprocessor_config.json` for the model of `config` (its evaluation preprocessing) and
    returns its contents; `extra` adds keys (e.g. {"image_seq_length": 256} for PaliGemma's processor)."""
    processor = {**image_processor_config(eval_preprocessing(config), kind), **(extra or {})}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, NAME), "w") as f:
        json.dump(processor, f, indent=2)
    return processor
