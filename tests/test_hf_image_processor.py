"""The exported preprocessor_config.json, loaded by transformers.AutoImageProcessor (Pillow backend: torchvision
is not installed), against this project's evaluation preprocessing.

No photographs ship with the installed packages, so the JPEGs are photo-like: smooth colour fields, fine texture,
hard-edged shapes and lines, sensor noise; quality 90, 4:2:0, as cameras and img2dataset write them."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from transformers import AutoImageProcessor

from data_pipelines.eval_split import build_image_op
from vlm_jax.config import ConfigError, base_config
from vlm_jax.evaluators.data import eval_preprocessing
from vlm_jax.hf.image_processor import image_processor_config, write_image_processor

# The requirement, in [-1, 1]: one uint8 level (0.008) of slack for another libjpeg build. Measured on the JPEGs
# below, both geometries, 224 and 256 px: max 1.2e-7, mean 4e-8 (float rounding: the same uint8 pixels). Before
# (scaled DCT decode, crop, then OpenCV resize): max 0.34-0.93, mean 0.012-0.039.
MAX_ABS = 1e-2


def photo_like_jpeg(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = rng.uniform(60, 190, 3) + sum(
        rng.uniform(10, 40, 3) * np.sin(2 * np.pi * (rng.uniform(0.5, 6) * x + rng.uniform(0.5, 6) * y)
                                        + rng.uniform(0, 6.3))[..., None] for _ in range(4))
    texture = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), np.uint8))
    pixels += (np.asarray(texture.resize((width, height), Image.BICUBIC), float) - 128) * 0.25
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, max(width, height) / 5)
        ellipse = [cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r]
        draw.ellipse(ellipse, fill=tuple(rng.integers(0, 256, 3).tolist()))
    for _ in range(20):
        draw.line(rng.uniform(0, [width, height, width, height]).tolist(), fill=tuple(rng.integers(0, 256, 3).tolist()),
                  width=int(rng.integers(1, 4)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), float) + rng.normal(0, 3, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def model_config(image_size: int, pp_eval: str = "", vlm: bool = False) -> ml_collections.ConfigDict:
    """`vlm`: a decoder-only VLM's config, whose default evaluation resizes whole images (PaliGemma)."""
    config = base_config()
    config.model.image.image_size = image_size
    config.data.pp_eval = pp_eval
    if vlm:
        config.data.vlm = {"image_tokens": (image_size // 16) ** 2}
    return config


def pixels_both_ways(config, tmp_path, data: bytes, kind: str = "siglip") -> tuple[np.ndarray, np.ndarray]:
    """(transformers' pixel_values, ours as the model sees them), both float [H, W, 3]."""
    write_image_processor(config, tmp_path, kind)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == {"siglip": "SiglipImageProcessorPil", "clip": "CLIPImageProcessorPil"}[kind]
    hf = processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = build_image_op(eval_preprocessing(config))({"image": data}, np.random.default_rng(0))["image"]
    if ours.dtype == np.uint8:  # the model's own mapping (vit.py)
        ours = ours.astype(np.float32) * (2 / 255) - 1
    return hf, ours


@pytest.mark.parametrize("kind, pp_eval", [
    ("siglip", ""), ("clip", ""), ("siglip", "decode|resize(32, method='bicubic')"),
    ("siglip", "decode|resize_small(32, method='bicubic')|center_crop(32)|value_range(0, 1)"),
    ("clip", "decode|resize_small(32, method='bicubic')|center_crop(32)|normalize((0.48, 0.46, 0.41), "
             "(0.27, 0.26, 0.28))")])
def test_same_pixels_for_images_at_the_model_size(tmp_path, kind, pp_eval):
    hf, ours = pixels_both_ways(model_config(32, pp_eval), tmp_path, photo_like_jpeg(0, 32, 32), kind)
    assert hf.shape == ours.shape == (32, 32, 3)
    np.testing.assert_allclose(hf, ours, atol=1e-5)


@pytest.mark.parametrize("vlm", [False, True], ids=["centre_crop", "square_resize"])
@pytest.mark.parametrize("image_size", [224, 256])
def test_default_eval_pixels_of_real_size_jpegs_are_transformers(tmp_path, vlm, image_size):
    """Non-square JPEGs larger than the model, with the default data.pp_eval: a centre crop (CLIP / SigLIP) or,
    for a VLM, the whole image resized to a square (PaliGemma)."""
    config = model_config(image_size, vlm=vlm)
    geometry = (f"resize({image_size}, method='bicubic')" if vlm else
                f"resize_small({image_size}, method='bicubic')|center_crop({image_size})")
    assert eval_preprocessing(config) == f"decode|{geometry}"
    for seed, (width, height) in enumerate([(500, 375), (333, 500), (1024, 683)]):
        hf, ours = pixels_both_ways(config, tmp_path, photo_like_jpeg(seed, width, height))
        error = np.abs(hf - ours)
        assert hf.shape == ours.shape == (image_size, image_size, 3)
        assert error.max() < MAX_ABS, (width, height, error.max(), error.mean())


def test_processor_config_keys_and_errors(tmp_path):
    written = write_image_processor(model_config(224), tmp_path, "clip", extra={"image_seq_length": 256})
    assert written == {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True, "resample": 3,
        "size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "image_seq_length": 256}
    assert AutoImageProcessor.from_pretrained(tmp_path).image_seq_length == 256
    assert image_processor_config("decode|resize_small(256, method='bicubic')|center_crop(224)")["size"] == {
        "shortest_edge": 256}
    inexact = ["decode|resize(64, method='bicubic')|flip_lr",  # an op transformers does not have
               "decode_center_crop(64)",  # scaled DCT decode, crop before an OpenCV resize
               "decode(64)|resize(64, method='bicubic')",  # scaled DCT decode
               "decode|resize_small(64)|center_crop(64)"]  # OpenCV's resize
    for pp, message in [*((pp, "has no transformers image processor equivalent") for pp in inexact),
                        ("decode|resize(64)|value_range|resize(64)", "one value mapping, last")]:
        with pytest.raises(ConfigError, match=message) as error:
            image_processor_config(pp)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="^image processor kind 'vit': expected one of siglip, clip$"):
        image_processor_config("resize(64)", "vit")
