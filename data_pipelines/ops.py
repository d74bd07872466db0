"""Per-sample preprocessing: decode, resize, normalise; caption text."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_pipelines.webdataset import IMAGE_EXTENSIONS


def decode_image(data: bytes, target_size: int | None = None) -> Image.Image:
    """RGB image; JPEGs much larger than `target_size` are decoded at a reduced scale (draft mode)."""
    image = Image.open(io.BytesIO(data))
    if target_size and image.format == "JPEG":
        image.draft("RGB", (target_size, target_size))
    return image.convert("RGB")


def resize(image: Image.Image, size: int) -> Image.Image:
    """Square resize (bilinear, antialiased)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def to_float(image: Image.Image) -> np.ndarray:
    """float32 [H, W, 3] in [-1, 1]."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def image_bytes(sample: dict) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise KeyError(f"sample {sample.get('__key__')} has no image")


def caption_text(sample: dict) -> str:
    return sample["txt"].decode("utf-8", errors="replace").strip()
