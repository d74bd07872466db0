"""Registered preprocessing ops, composed from a spec string declared in the config.

    "decode_rrc(224, scale=(0.08, 1.0))|flip_lr|value_range(-1, 1)|tokenize(16)|keep('image', 'text')"

Each op maps a sample dict to a sample dict and gets a `np.random.Generator` (deterministic per sample, so an
iterator restored from a checkpoint repeats the same crops). Images are uint8 [H, W, 3] until an op such as
`value_range` turns them into float32. Ops that cannot use a sample raise SampleError.
"""

from __future__ import annotations

import ast
import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image

from data_pipelines.samples import SampleError

Op = Callable[[dict, np.random.Generator], dict]
OPS: dict[str, Callable[..., Op]] = {}
# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale; only use it when the result stays this much above target.
_DRAFT_MARGIN = 1.0


def register(name: str) -> Callable:
    """Decorator: makes `factory(*args, **kwargs) -> Op` available as `name(...)` in spec strings."""
    def wrap(factory: Callable[..., Op]) -> Callable[..., Op]:
        OPS[name] = factory
        return factory
    return wrap


def parse_spec(spec: str) -> list[tuple[str, tuple, dict]]:
    """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})]; arguments must be Python literals."""
    parsed = []
    for item in (part.strip() for part in spec.split("|")):
        if not item:
            continue
        try:
            node = ast.parse(item, mode="eval").body
            if isinstance(node, ast.Name):
                name, args, kwargs = node.id, (), {}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                name = node.func.id
                args = tuple(ast.literal_eval(arg) for arg in node.args)
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            else:
                raise ValueError
        except (SyntaxError, ValueError):
            raise ValueError(f"preprocessing op {item!r} is not of the form name or name(literal args)") from None
        if name not in OPS:
            raise ValueError(f"unknown preprocessing op {name!r}; known: {', '.join(sorted(OPS))}")
        parsed.append((name, args, kwargs))
    return parsed


def build(spec: str, **context: Any) -> Op:
    """One op running the spec's ops in order. `context` supplies shared resources, e.g. tokenizer=path."""
    ops = []
    for name, args, kwargs in parse_spec(spec):
        factory = OPS[name]
        if name in _NEEDS_CONTEXT:
            kwargs = {**kwargs, **{key: context[key] for key in _NEEDS_CONTEXT[name]}}
        try:
            ops.append(factory(*args, **kwargs))
        except TypeError as e:
            raise ValueError(f"preprocessing op {name}: {e}") from None

    def run(sample: dict, rng: np.random.Generator) -> dict:
        for op in ops:
            sample = op(sample, rng)
        return sample
    return run


# ---- images ------------------------------------------------------------------------------------------------

def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for bytes that are not an image
        raise SampleError("corrupt_image", repr(e)) from None


def _load_rgb(image: Image.Image) -> np.ndarray:
    try:
        return np.asarray(image.convert("RGB"))
    except Exception as e:  # truncated or corrupt data surfaces when the pixels are decoded
        raise SampleError("corrupt_image", repr(e)) from None


def _draft(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple:
    """Lets a JPEG decode at 1/2..1/8 scale when `box` stays at least `size` large; returns the scaled box."""
    if image.format != "JPEG":
        return box
    full_width, full_height = image.size
    scale = min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]) / _DRAFT_MARGIN
    if scale < 2:
        return box
    image.draft("RGB", (math.ceil(full_width / scale), math.ceil(full_height / scale)))
    fx, fy = image.size[0] / full_width, image.size[1] / full_height
    return (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def _crop_resize(data: bytes, box: Callable[[int, int], tuple], size: int) -> np.ndarray:
    image = _open(data)
    target = (size, size)
    scaled_box = _draft(image, box(*image.size), target)
    try:
        image = image.convert("RGB")
        return np.asarray(image.resize(target, Image.Resampling.BILINEAR, box=scaled_box))
    except Exception as e:
        raise SampleError("corrupt_image", repr(e)) from None


def sample_crop(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """Inception-style random crop box (left, top, right, bottom), as torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the centre crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_box(width: int, height: int, crop_fraction: float) -> tuple[int, int, int, int]:
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


@register("decode")
def decode(min_size: int | None = None) -> Op:
    """Encoded bytes -> uint8 [H, W, 3]; with `min_size`, a JPEG decodes at the smallest scale whose short
    side stays >= min_size (draft mode)."""
    def op(sample, rng):
        image = _open(sample["image"])
        if min_size:
            width, height = image.size
            _draft(image, (0, 0, width, height), (min_size * width // min(width, height),
                                                  min_size * height // min(width, height)))
        return {**sample, "image": _load_rgb(image)}
    return op


@register("decode_rrc")
def decode_random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Op:
    """Decode + random resized crop in one step: the crop is chosen on the header's size, then the JPEG is
    decoded at the smallest scale that keeps the crop >= size (big_vision's decode_jpeg_and_inception_crop)."""
    def op(sample, rng):
        crop = lambda width, height: sample_crop(width, height, rng, scale, ratio)
        return {**sample, "image": _crop_resize(sample["image"], crop, size)}
    return op


@register("decode_center_crop")
def decode_center_crop(size: int, crop_fraction: float = 1.0) -> Op:
    """Decode + centre square crop (a fraction of the short side) resized to size, with scaled decoding."""
    def op(sample, rng):
        crop = lambda width, height: _centre_box(width, height, crop_fraction)
        return {**sample, "image": _crop_resize(sample["image"], crop, size)}
    return op


def _resample(image: np.ndarray, box: tuple, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, box=box))


@register("resize")
def resize(size: int) -> Op:
    """Square resize (bilinear, antialiased), aspect not kept."""
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        if (height, width) == (size, size):
            return sample
        return {**sample, "image": _resample(sample["image"], (0, 0, width, height), (size, size))}
    return op


@register("resize_small")
def resize_small(size: int) -> Op:
    """Resize keeping the aspect ratio so the short side is `size`."""
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        factor = size / min(height, width)
        target = (max(size, round(width * factor)), max(size, round(height * factor)))
        return {**sample, "image": _resample(sample["image"], (0, 0, width, height), target)}
    return op


@register("center_crop")
def center_crop(size: int) -> Op:
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        if height < size or width < size:
            raise ValueError(f"center_crop({size}) of a {height}x{width} image: resize first")
        top, left = (height - size) // 2, (width - size) // 2
        return {**sample, "image": sample["image"][top:top + size, left:left + size]}
    return op


@register("random_resized_crop")
def random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Op:
    """Random resized crop of a decoded image (use decode_rrc to also decode at reduced scale)."""
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        box = sample_crop(width, height, rng, scale, ratio)
        return {**sample, "image": _resample(sample["image"], box, (size, size))}
    return op


@register("flip_lr")
def flip_lr(probability: float = 0.5) -> Op:
    def op(sample, rng):
        if rng.uniform() < probability:
            return {**sample, "image": np.ascontiguousarray(sample["image"][:, ::-1])}
        return sample
    return op


@register("value_range")
def value_range(low: float = -1.0, high: float = 1.0) -> Op:
    """uint8 [0, 255] -> float32 [low, high]."""
    def op(sample, rng):
        image = sample["image"].astype(np.float32)
        return {**sample, "image": image * ((high - low) / 255.0) + low}
    return op


@register("normalize")
def normalize(mean: tuple[float, float, float], std: tuple[float, float, float]) -> Op:
    """uint8 -> float32 (x / 255 - mean) / std per channel (e.g. CLIP's mean and std)."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    def op(sample, rng):
        return {**sample, "image": sample["image"] * scale - shift}
    return op


# ---- text and structure -----------------------------------------------------------------------------------

@register("lower")
def lower(key: str = "caption") -> Op:
    def op(sample, rng):
        return {**sample, key: sample[key].lower()}
    return op


@register("tokenize")
def tokenize(max_len: int, key: str = "caption", out: str = "text", eos: bool = True, *,
             tokenizer: str) -> Op:
    """Sentencepiece ids, EOS appended (unless eos=False), truncated or padded to max_len: int32 [max_len]."""
    from data_pipelines.tokenizer import Tokenizer  # sentencepiece loads once per op, in each worker
    model = Tokenizer(tokenizer)
    def op(sample, rng):
        if key not in sample:
            raise SampleError("no_caption")
        return {**sample, out: model.encode([sample[key]], max_len, add_eos=eos)[0]}
    return op


@register("keep")
def keep(*keys: str) -> Op:
    """Keeps only `keys` (the arrays that are batched); a missing key is an error in the spec."""
    def op(sample, rng):
        missing = [key for key in keys if key not in sample]
        if missing:
            raise KeyError(f"keep{keys}: the sample has no {missing} (fields: {sorted(sample)})")
        return {key: sample[key] for key in keys}
    return op


_NEEDS_CONTEXT = {"tokenize": ("tokenizer",)}
