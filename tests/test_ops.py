"""Preprocessing ops: spec parsing, crops, scaled JPEG decoding against a full decode, text ops."""

import io

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from data_pipelines import ops
from data_pipelines.samples import FLAGS_KEY, DataError, SampleError
from data_pipelines.tokenizer import Tokenizer


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


def test_bicubic_resizes_are_pillows_with_transformers_rounding():
    """method='bicubic' (evaluation) is Pillow's BICUBIC, the long side of resize_small floored as transformers
    does (47 * 10 / 30 = 15.7 -> 15); the default (training) stays OpenCV's, rounded (16)."""
    sample = {"image": encoded(47, 30)}
    full = Image.open(io.BytesIO(sample["image"])).convert("RGB")
    small = run("decode|resize_small(10, method='bicubic')", sample)["image"]
    np.testing.assert_array_equal(small, np.asarray(full.resize((15, 10), Image.Resampling.BICUBIC)))
    assert run("decode|resize_small(10)", sample)["image"].shape == (10, 16, 3)
    tall = run("decode|resize_small(10, method='bicubic')", {"image": encoded(30, 47)})["image"]
    assert tall.shape == (15, 10, 3)
    square = run("decode|resize(12, method='bicubic')", sample)["image"]
    np.testing.assert_array_equal(square, np.asarray(full.resize((12, 12), Image.Resampling.BICUBIC)))
    for spec in ("resize(8, method='cubic')", "resize_small(8, method='area')"):
        with pytest.raises(ValueError, match=r"^preprocessing op resize(_small)?: method '\w+'; expected one of "
                                             r"linear, bicubic$"):
            ops.build(spec)


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


BOS, EOS, PAD = 3, 1, 0


def test_tokenize_bos_and_case_options(synthetic_shards):
    tokenizer = str(synthetic_shards / "spm.model")
    model = Tokenizer(tokenizer)
    words = model.ids("a red circle")
    assert model.bos_id == BOS and model.eos_id == EOS and model.pad_id == PAD and BOS not in words
    out = run("tokenize(8, bos=True)", {"caption": "A Red circle"}, tokenizer=tokenizer)["text"]
    np.testing.assert_array_equal(out, ([BOS] + words + [EOS] + [PAD] * 8)[:8])
    default = run("tokenize(8)", {"caption": "A Red circle"}, tokenizer=tokenizer)["text"]
    np.testing.assert_array_equal(default, (words + [EOS] + [PAD] * 8)[:8])  # unchanged: lower-cased, no BOS
    cased = run("tokenize(8, lower=False)", {"caption": "A Red circle"}, tokenizer=tokenizer)["text"]
    assert list(cased[:len(words) + 1]) != words + [EOS]  # capitals are other pieces (or unknown)
    short = run("tokenize(3, bos=True)", {"caption": "a red circle"}, tokenizer=tokenizer)["text"]
    np.testing.assert_array_equal(short, [BOS, words[0], EOS])  # truncated: BOS first, EOS last


def test_caption_targets_shift_the_targets_behind_bos(synthetic_shards):
    tokenizer = str(synthetic_shards / "spm.model")
    words = Tokenizer(tokenizer).ids("a red circle")
    n = len(words)
    out = run("caption_targets(8)|keep('text_input', 'text_target', 'text_loss_mask')",
              {"caption": "A red circle"}, tokenizer=tokenizer)
    assert all(v.dtype == np.int32 and v.shape == (8,) for v in out.values())
    np.testing.assert_array_equal(out["text_target"], words + [EOS] + [PAD] * (7 - n))
    np.testing.assert_array_equal(out["text_input"], [BOS] + words + [PAD] * (7 - n))
    np.testing.assert_array_equal(out["text_loss_mask"], [1] * (n + 1) + [0] * (7 - n))
    cut = run("caption_targets(3)", {"caption": "a red circle"}, tokenizer=tokenizer)
    np.testing.assert_array_equal(cut["text_target"], words[:2] + [EOS])
    np.testing.assert_array_equal(cut["text_input"], [BOS] + words[:2])
    np.testing.assert_array_equal(cut["text_loss_mask"], [1, 1, 1])


def test_prefix_lm_sequence_and_masks(synthetic_shards):
    tokenizer = str(synthetic_shards / "spm.model")
    model = Tokenizer(tokenizer)
    prompt, sep, caption = model.ids("describe"), model.ids(";", lower=False), model.ids("a red circle")
    assert sep  # ';' is a piece or the unknown id
    prefix = [BOS] + prompt + sep
    suffix = caption + [EOS]
    length = 24
    pad = length - len(prefix) - len(suffix)
    out = run("prefix_lm(24, prompt='Describe', sep=';')", {"caption": "A red circle"}, tokenizer=tokenizer)
    np.testing.assert_array_equal(out["text"], prefix + suffix + [PAD] * pad)
    np.testing.assert_array_equal(out["mask_ar"], [0] * len(prefix) + [1] * len(suffix) + [1] * pad)
    np.testing.assert_array_equal(out["mask_loss"], [0] * len(prefix) + [1] * len(suffix) + [0] * pad)
    from_field = run("prefix_lm(24, sep=';')", {"prefix": "describe", "caption": "a red circle"},
                     tokenizer=tokenizer)
    np.testing.assert_array_equal(from_field["text"], out["text"])
    cut = run("prefix_lm(5, prompt='describe', sep=';')", {"caption": "a red circle"}, tokenizer=tokenizer)
    np.testing.assert_array_equal(cut["text"], (prefix + suffix)[:5])
    np.testing.assert_array_equal(cut["mask_loss"], ([0] * len(prefix) + [1] * len(suffix))[:5])
    with pytest.raises(SampleError, match="no_caption: no field 'prefix'"):
        run("prefix_lm(24, sep=';')", {"caption": "a red circle"}, tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"^prefix_lm separator '\\n' encodes to no ids with tokenizer .*spm.model; "
                                        r"pass another sep, e.g. sep=';'$"):
        run("prefix_lm(24)", {}, tokenizer=tokenizer)


def test_bos_from_a_model_without_one_is_a_one_line_error(tmp_path):
    """Models trained before BOS was reserved (bos_id=-1) still encode; asking them for BOS fails at build."""
    path = str(tmp_path / "no_bos.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle", "a blue square"] * 50),
                                   model_prefix=path[:-len(".model")], vocab_size=20, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    assert run("tokenize(6)", {"caption": "a red circle"}, tokenizer=path)["text"].shape == (6,)
    message = (f"^tokenizer {path} has no BOS piece: retrain it with `python -m data_pipelines.tokenizer train` "
               r"\(which reserves id 3 for BOS\)$")
    for spec in ("tokenize(6, bos=True)", "caption_targets(6)", "prefix_lm(6, sep='a')"):
        with pytest.raises(DataError, match=message):
            ops.build(spec, tokenizer=path)


def test_truncated_text_is_flagged_and_keep_preserves_the_flag(synthetic_shards):
    """Each text op flags a sample whose ids it cut ("truncated_captions"), once per sample, and only then."""
    tokenizer = str(synthetic_shards / "spm.model")
    long, short = {"caption": "a big red circle " * 4}, {"caption": "a red circle"}
    specs = ("tokenize(6)|keep('text')", "caption_targets(6)|keep('text_target')",
             "prefix_lm(8, prompt='describe', sep=';')|keep('text')", "tokenize(6)|caption_targets(6)")
    for spec in specs:
        assert run(spec, long, tokenizer=tokenizer)[FLAGS_KEY] == {"truncated_captions"}, spec
        assert FLAGS_KEY not in run(spec.replace("(6", "(24").replace("(8", "(24"), short,
                                    tokenizer=tokenizer), spec
    fits = len(Tokenizer(tokenizer).ids("a red circle")) + 1  # ids and EOS: exactly the length, not truncated
    assert FLAGS_KEY not in run(f"tokenize({fits})", short, tokenizer=tokenizer)
    assert run(f"tokenize({fits - 1})", short, tokenizer=tokenizer)[FLAGS_KEY] == {"truncated_captions"}
