"""Preprocessing ops: spec parsing, crops, scaled JPEG decoding against a full decode, text ops."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import ops
from data_pipelines.samples import DataError, SampleError


def encoded(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A smooth image (gradients), so scaled decoding can be compared with a full decode."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def run(spec: str, sample: dict, seed: int = 0, **context) -> dict:
    return ops.build(spec, **context)(dict(sample), np.random.default_rng(seed))


def test_spec_parsing_and_errors():
    assert ops.parse_spec("decode | resize(8)|value_range(0, 1)|keep('image')") == [
        ("decode", (), {}), ("resize", (8,), {}), ("value_range", (0, 1), {}), ("keep", ("image",), {})]
    with pytest.raises(ValueError, match="unknown preprocessing op 'blur'; known: .*decode"):
        ops.parse_spec("decode|blur(3)")
    with pytest.raises(ValueError, match="is not of the form name or name"):
        ops.parse_spec("resize(size=open('x'))")
    with pytest.raises(ValueError, match="preprocessing op resize: .*unexpected keyword"):
        ops.build("resize(8, colour=1)")


def test_image_pipeline_shapes_and_ranges():
    sample = {"image": encoded(40, 30), "caption": "x"}
    out = run("decode|resize_small(10)|center_crop(10)|flip_lr(1.0)|value_range(-1, 1)", sample)
    assert out["image"].shape == (10, 10, 3) and out["image"].dtype == np.float32
    assert -1 <= out["image"].min() and out["image"].max() <= 1
    assert run("decode|resize_small(10)", sample)["image"].shape == (10, 13, 3)  # aspect kept
    assert run("decode|resize(12)", sample)["image"].shape == (12, 12, 3)
    normalised = run("decode|normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))", sample)["image"]
    raw = run("decode", sample)["image"]
    np.testing.assert_allclose(normalised, (raw / 255.0 - 0.5) / 0.25, atol=1e-5)
    flipped = run("decode|flip_lr(1.0)", sample)["image"]
    np.testing.assert_array_equal(flipped, raw[:, ::-1])
    assert run("decode_rrc(16)", {"image": encoded(20, 20, "PNG")})["image"].shape == (16, 16, 3)


def test_random_crops_are_deterministic_per_generator_and_vary_across():
    sample = {"image": encoded(64, 48)}
    crops = [run("decode_rrc(16, scale=(0.1, 0.5))", sample, seed)["image"] for seed in (0, 0, 1)]
    np.testing.assert_array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[0], crops[2])
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = ops.sample_crop(64, 48, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.08 * 64 * 48 * 0.9 <= (right - left) * (bottom - top)


def test_scaled_jpeg_decode_matches_a_full_decode():
    """A 1024 x 768 JPEG centre-cropped to 64 px decodes at 1/8 scale; pixels agree with a full decode."""
    sample = {"image": encoded(1024, 768)}
    fast = run("decode_center_crop(64)", sample)["image"].astype(np.float32)
    full = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
    left = (1024 - 768) // 2
    reference = Image.fromarray(full).resize((64, 64), Image.Resampling.BILINEAR,
                                             box=(left, 0, left + 768, 768))
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - np.asarray(reference, np.float32)).mean() < 2.0
    assert ops.decode_image(sample["image"], 86, 64).shape == (96, 128, 3)  # 1/8 scale: the crop stays >= 64
    assert run("decode(100)", sample)["image"].shape == (192, 256, 3)  # 1/4 scale keeps the side >= 100


def test_broken_images_raise_sample_errors():
    for data in (b"not an image", encoded(32, 32)[:100]):
        for spec in ("decode", "decode_rrc(8)", "decode_center_crop(8)"):
            with pytest.raises(SampleError) as error:
                run(spec, {"image": data})
            assert error.value.reason == "corrupt_image"


def test_text_ops(synthetic_shards):
    tokenizer = str(synthetic_shards / "spm.model")
    out = run("lower|tokenize(8)|keep('text')", {"caption": "A RED Circle"}, tokenizer=tokenizer)
    assert list(out) == ["text"] and out["text"].shape == (8,) and out["text"].dtype == np.int32
    assert 1 in out["text"]  # EOS
    no_eos = run("tokenize(8, eos=False)", {"caption": "a red circle"}, tokenizer=tokenizer)["text"]
    assert 1 not in no_eos
    with pytest.raises(SampleError, match="no_caption"):
        run("tokenize(8)", {"image": b""}, tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"^preprocessing op keep\('label',\): the samples have no field label "
                                        r"\(fields: caption\); fix the data.pp spec$"):
        run("keep('label')", {"caption": "x"})
