"""Registered preprocessing ops, composed from a spec string declared in the config.

    "decode_rrc(224, scale=(0.08, 1.0))|flip_lr|value_range(-1, 1)|tokenize(16)|keep('image', 'text')"

Each op maps a sample dict to a sample dict and gets a `np.random.Generator` (deterministic per sample, so an
iterator restored from a checkpoint repeats the same crops). Images are uint8 [H, W, 3] until an op such as
`value_range` turns them into float32. Ops that cannot use a sample raise SampleError; ops that use it but
count an event (a truncated caption) mark it with samples.flag, which `keep` preserves.
"""

from __future__ import annotations

import ast
import io
import math
from typing import Any, Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from data_pipelines.samples import FLAGS_KEY, DataError, SampleError, flag

Op = Callable[[dict, np.random.Generator], dict]
OPS: dict[str, Callable[..., Op]] = {}


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
# JPEGs decode with libjpeg-turbo through simplejpeg, at a reduced scale (M/8) when the crop allows; other
# formats and JPEGs simplejpeg refuses (CMYK, ...) go through Pillow. Resizes use OpenCV. Measured on one core
# (README, "Data pipeline"): 256-px JPEG -> random-resized crop 224 about 3x faster than Pillow alone.
# Evaluation instead decodes at full size and resizes with Pillow's bicubic (method="bicubic"), which gives
# transformers' image processors' pixels exactly (data_pipelines/eval_split.py default_pp_eval).

cv2.setNumThreads(1)  # one image per worker process; OpenCV's own threads would only contend
Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone."""
    if _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass  # a header simplejpeg cannot parse: Pillow reads it, or names the fault
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception as e:  # PIL raises several types for bytes that are not an image
        raise SampleError("corrupt_image", repr(e)) from None


def decode_image(data: bytes, min_width: int = 0, min_height: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]; a JPEG decodes at the smallest M/8 scale keeping W >= min_width and H >= min_height."""
    if _is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(data, "RGB", min_height=min_height, min_width=min_width)
        except ValueError:
            pass  # CMYK and other JPEGs simplejpeg refuses; corrupt ones fail again below with the reason
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and (min_width or min_height):
                image.draft("RGB", (min_width, min_height))
            return np.asarray(image.convert("RGB"))
    except Exception as e:  # truncated or corrupt data surfaces when the pixels are decoded
        raise SampleError("corrupt_image", repr(e)) from None


RESIZE_METHODS = ("linear", "bicubic")


def _check_method(op: str, method: str) -> None:
    """A one-line ValueError, when the spec is built, for an unknown resize method."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"preprocessing op {op}: method {method!r}; expected one of {', '.join(RESIZE_METHODS)}")


def _resize(image: np.ndarray, width: int, height: int, method: str = "linear") -> np.ndarray:
    """method "linear": OpenCV bilinear, area averaging when shrinking more than 2x (bilinear would alias); fast,
    for training. "bicubic": Pillow's antialiased BICUBIC, as transformers' image processors (and torchvision's
    Resize of PIL images) do; for evaluation, so exported models see the same pixels."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    if method == "bicubic":
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    shrink = min(image.shape[1] / width, image.shape[0] / height)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR)


def _crop(image: np.ndarray, box: Box) -> np.ndarray:
    left, top, right, bottom = (int(round(v)) for v in box)
    return image[max(top, 0):max(bottom, top + 1), max(left, 0):max(right, left + 1)]


def _decode_crop_resize(data: bytes, choose_box: Callable[[int, int], Box], size: int) -> np.ndarray:
    """Decodes only as much resolution as the chosen crop needs, then crops and resizes to size x size."""
    width, height = _image_size(data)
    box = choose_box(width, height)
    image = decode_image(data, math.ceil(size * width / max(box[2] - box[0], 1)),
                    math.ceil(size * height / max(box[3] - box[1], 1)))
    fx, fy = image.shape[1] / width, image.shape[0] / height
    return _resize(_crop(image, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)), size, size)


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


def _centre_box(width: int, height: int, crop_fraction: float) -> Box:
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


@register("decode")
def decode(min_size: int | None = None) -> Op:
    """Encoded bytes -> uint8 [H, W, 3]; with `min_size`, a JPEG decodes at the smallest scale whose short
    side stays >= min_size."""
    def op(sample, rng):
        if not min_size:
            return {**sample, "image": decode_image(sample["image"])}
        width, height = _image_size(sample["image"])
        short = min(width, height)
        image = decode_image(sample["image"], math.ceil(min_size * width / short), math.ceil(min_size * height / short))
        return {**sample, "image": image}
    return op


@register("decode_rrc")
def decode_random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Op:
    """Decode + random resized crop in one step: the crop is chosen on the header's size, then the JPEG is
    decoded at the smallest scale that keeps the crop >= size (big_vision's decode_jpeg_and_inception_crop)."""
    def op(sample, rng):
        choose = lambda width, height: sample_crop(width, height, rng, scale, ratio)
        return {**sample, "image": _decode_crop_resize(sample["image"], choose, size)}
    return op


@register("decode_center_crop")
def decode_center_crop(size: int, crop_fraction: float = 1.0) -> Op:
    """Decode + centre square crop (a fraction of the short side) resized to size, with scaled decoding."""
    def op(sample, rng):
        choose = lambda width, height: _centre_box(width, height, crop_fraction)
        return {**sample, "image": _decode_crop_resize(sample["image"], choose, size)}
    return op


@register("resize")
def resize(size: int, method: str = "linear") -> Op:
    """Square resize, aspect not kept; `method` "linear" (OpenCV) or "bicubic" (Pillow, as transformers)."""
    _check_method("resize", method)
    def op(sample, rng):
        return {**sample, "image": _resize(sample["image"], size, size, method)}
    return op


@register("resize_small")
def resize_small(size: int, method: str = "linear") -> Op:
    """Resize keeping the aspect ratio so the short side is `size`. method "linear" (OpenCV) rounds the long
    side; "bicubic" (Pillow) floors it, as transformers' and torchvision's shortest-edge resizes do."""
    _check_method("resize_small", method)
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        if method == "bicubic":
            long = int(size * max(height, width) / min(height, width))  # transformers' expression, same float
            target = (size, long) if width <= height else (long, size)
        else:
            factor = size / min(height, width)
            target = (max(size, round(width * factor)), max(size, round(height * factor)))
        return {**sample, "image": _resize(sample["image"], *target, method)}
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
    """Random resized crop of a decoded image (decode_rrc also decodes at reduced scale: prefer it)."""
    def op(sample, rng):
        height, width = sample["image"].shape[:2]
        box = sample_crop(width, height, rng, scale, ratio)
        return {**sample, "image": _resize(_crop(sample["image"], box), size, size)}
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
        image *= (high - low) / 255.0  # in place: each new 600 KB array costs page faults
        image += low
        return {**sample, "image": image}
    return op


@register("normalize")
def normalize(mean: tuple[float, float, float], std: tuple[float, float, float]) -> Op:
    """uint8 -> float32 (x / 255 - mean) / std per channel (e.g. CLIP's mean and std)."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    def op(sample, rng):
        image = sample["image"] * scale
        image -= shift
        return {**sample, "image": image}
    return op


# ---- text and structure -----------------------------------------------------------------------------------

@register("lower")
def lower(key: str = "caption") -> Op:
    def op(sample, rng):
        return {**sample, key: sample[key].lower()}
    return op


def _text(sample: dict, key: str) -> str:
    if key not in sample:
        raise SampleError("no_caption", f"no field {key!r}")
    return sample[key]


def _counted(sample: dict, truncated: bool) -> dict:
    """`sample`, flagged "truncated_captions" if its text was truncated."""
    return flag(sample, "truncated_captions") if truncated else sample


@register("tokenize")
def tokenize(max_len: int, key: str = "caption", out: str = "text", eos: bool = True, bos: bool = False,
             lower: bool = True, *, tokenizer: str) -> Op:
    """Sentencepiece ids of sample[key] as int32 [max_len]: [BOS] ids [EOS] 0-padding, truncated with EOS kept
    last (and counted: "truncated_captions"). EOS is appended unless eos=False, BOS prepended with bos=True (a
    model without BOS: DataError). `lower` (default) lower-cases the text first, as the contrastive models and
    their tokenizers expect."""
    from data_pipelines.tokenizer import Tokenizer  # sentencepiece loads once per op, in each worker
    model = Tokenizer(tokenizer)
    if bos:
        model.require_bos()
    def op(sample, rng):
        ids, truncated = model.encode_one(_text(sample, key), max_len, add_eos=eos, add_bos=bos, lower=lower)
        return _counted({**sample, out: ids}, truncated)
    return op


@register("caption_targets")
def caption_targets(max_len: int, key: str = "caption", lower: bool = True, *, tokenizer: str) -> Op:
    """A caption's decoder fields for teacher forcing (captioning, CapPa's autoregressive share), each int32
    [max_len]; with the caption's ids t1..tn (truncated to max_len - 1, EOS kept; counted "truncated_captions"):

        text_target     t1 t2 ... tn EOS 0 ... 0      the tokens to predict
        text_input      BOS t1 ... tn 0 ... 0         the decoder's input: the targets shifted right behind BOS
                                                      (position i sees token i-1 when it predicts token i)
        text_loss_mask  1 1 ... 1  1  0 ... 0         1 on the supervised tokens (ids and EOS), 0 on padding

    The loss is the token cross-entropy of text_target where text_loss_mask is 1. CapPa's parallel share
    replaces text_input by [MASK] ids in the model, not here.
    """
    from data_pipelines.tokenizer import Tokenizer
    model = Tokenizer(tokenizer)
    bos = model.require_bos()
    def op(sample, rng):
        target, truncated = model.encode_one(_text(sample, key), max_len, lower=lower)
        loss_mask = (target != model.pad_id).astype(np.int32)
        shifted = np.concatenate([np.array([bos], np.int32), target[:-1]])
        text_input = np.where(loss_mask == 1, shifted, model.pad_id).astype(np.int32)
        return _counted({**sample, "text_input": text_input, "text_target": target, "text_loss_mask": loss_mask},
                        truncated)
    return op


class PrefixLmText:
    """The two parts of a prefix-LM text, as ids: [BOS] prefix-ids sep-ids (bidirectional) and suffix-ids EOS
    (supervised). An empty prefix has no separator: [BOS] | suffix-ids EOS. `owner` names the setting in the
    error for a separator that encodes to no ids."""

    def __init__(self, tokenizer: str, sep: str, lower: bool = True, owner: str = "prefix_lm"):
        from data_pipelines.tokenizer import Tokenizer  # sentencepiece loads once per op, in each worker
        self.model, self.lower = Tokenizer(tokenizer), lower
        self.bos, self.sep_ids = self.model.require_bos(), self.model.ids(sep, lower=False)
        if not self.sep_ids:
            raise DataError(f"{owner} separator {sep!r} encodes to no ids with tokenizer {tokenizer}; "
                            "pass another sep, e.g. sep=';'")

    def prefix(self, text: str) -> tuple[list[int], list[int]]:
        """(BOS + the prefix's ids, the separator's ids or [] for an empty prefix)."""
        ids = self.model.ids(text, self.lower)
        return [self.bos] + ids, self.sep_ids if ids else []

    def suffix(self, text: str) -> list[int]:
        return self.model.ids(text, self.lower) + [self.model.eos_id]


@register("prefix_lm")
def prefix_lm(max_len: int, prompt: str | None = None, prefix_key: str = "prefix", suffix_key: str = "caption",
              sep: str = "\n", lower: bool = True, *, tokenizer: str) -> Op:
    """One prefix-LM sequence as big_vision's PaliGemma builds it (the image tokens go in front of it, in the
    model), each field int32 [max_len], truncated at max_len (counted "truncated_captions"):

        text       BOS prefix-ids sep-ids | suffix-ids EOS | 0 ... 0
        mask_ar    0   0 ...      0 ...   | 1 ...      1   | 1 ... 1   0: attends bidirectionally (with the
                                                                       image); 1: causal (see big_vision's
                                                                       make_attn_mask); padding counts as causal
        mask_loss  0   0 ...      0 ...   | 1 ...      1   | 0 ... 0   1: supervised (suffix and its EOS)

    The prefix is `prompt` for every sample (e.g. "caption en") or, when prompt is None, sample[prefix_key];
    the suffix is sample[suffix_key]. `sep` must encode to at least one id (sentencepiece models trained by
    data_pipelines.tokenizer drop "\n": pass e.g. sep=";"). An empty prefix gets no separator (PrefixLmText).
    """
    parts = PrefixLmText(tokenizer, sep, lower)
    def op(sample, rng):
        head, sep_ids = parts.prefix(prompt if prompt is not None else _text(sample, prefix_key))
        prefix_ids = head + sep_ids
        suffix_ids = parts.suffix(_text(sample, suffix_key))
        length = min(len(prefix_ids) + len(suffix_ids), max_len)
        text = np.full(max_len, parts.model.pad_id, np.int32)
        text[:length] = (prefix_ids + suffix_ids)[:length]
        mask_ar = np.ones(max_len, np.int32)
        mask_ar[:len(prefix_ids)] = 0
        mask_loss = np.zeros(max_len, np.int32)
        mask_loss[len(prefix_ids):length] = 1
        return _counted({**sample, "text": text, "mask_ar": mask_ar, "mask_loss": mask_loss},
                        len(prefix_ids) + len(suffix_ids) > max_len)
    return op


@register("keep")
def keep(*keys: str) -> Op:
    """Keeps only `keys` (the arrays that are batched) and the sample's flags. A missing key is a mistake in the
    spec, not in the data: DataError on the first sample, naming the key and the fields the sample has."""
    def op(sample, rng):
        missing = [key for key in keys if key not in sample]
        if missing:
            raise DataError(f"preprocessing op keep{keys}: the samples have no field {', '.join(missing)} "
                            f"(fields: {', '.join(sorted(sample))}); fix the data.pp spec")
        return {key: sample[key] for key in (*keys, FLAGS_KEY) if key in sample}
    return op


_NEEDS_CONTEXT = {name: ("tokenizer",) for name in ("tokenize", "caption_targets", "prefix_lm")}
