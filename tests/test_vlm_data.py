"""Decoder-only VLM input: example ops (task mixture, templates, text-only sources), the row format, packing against
one example per row, exact resume of packed pipelines, data.filters and the counters through packed rows."""

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image

from data_pipelines.input_pipeline import TrainInput, make_train_dataset
from data_pipelines.packing import RowIterDataset, RowLayout, make_row, row_layout
from data_pipelines.preprocess import COUNTERS, SKIPPED_KEY
from data_pipelines.samples import SOURCE_NAME_KEY, DataError, SampleError
from data_pipelines.shard_writer import ShardSample, write_shard
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.vlm_examples import example_op, fit_text, vlm_options
from vlm_jax.config import ConfigError, base_config, validate

BOS, EOS = 3, 1
TASKS = {"caption": {"weight": 2, "prefix": "caption", "suffix": "{caption}"},
         "colour": {"weight": 1, "prefix": "what colour?", "suffix": "{colour}"}}
ROW_KEYS = ("tokens", "image_slot", "segment_ids", "positions", "prefix_end", "targets", "loss_weights")


def jpeg(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def counters(**counts) -> np.ndarray:
    return np.array([counts.get(name, 0) for name in COUNTERS], np.int32)


def test_row_of_an_image_example_and_a_text_only_example(synthetic_shards):
    """Both examples through the example op (constant prompt + field template; text-only default task), then one
    packed row, checked position by position."""
    tokenizer = str(synthetic_shards / "spm.model")
    ids = Tokenizer(tokenizer).ids
    options = vlm_options({"image_tokens": 3, "text_len": 16, "tasks": {"colour": TASKS["colour"]}, "pack": True,
                           "pack_images": 2, "pack_length": 40},
                          {"img": {"shards": "", "weight": 1}, "web": {"shards": "", "weight": 1, "text_only": True}})
    op = example_op(options, "decode|resize(4)", tokenizer)
    rng = np.random.default_rng(0)
    image_example = op({"image": jpeg(0), "caption": "a red circle", "colour": "red", SOURCE_NAME_KEY: "img"}, rng)
    text_example = op({"caption": "a blue box", SOURCE_NAME_KEY: "web"}, rng)
    prefix = [BOS] + ids("what colour?") + ids(";", lower=False)
    assert list(image_example["text"]) == prefix + ids("red") + [EOS] and image_example["prefix_len"] == len(prefix)
    assert image_example["image"].shape == (4, 4, 3) and image_example["image"].dtype == np.uint8
    text = [BOS] + ids("a blue box") + [EOS]
    assert list(text_example["text"]) == text and text_example["prefix_len"] == 1 and "image" not in text_example

    image_example[SKIPPED_KEY], text_example[SKIPPED_KEY] = counters(examples=1), counters(examples=1, no_image=2)
    row = make_row([image_example, text_example], row_layout(options, 4))
    a, b = len(prefix) + len(ids("red")) + 1, len(text)  # text lengths
    n1, n2 = 3 + a, b  # sequence lengths: 3 image tokens + text, text only
    pad = 40 - n1 - n2
    np.testing.assert_array_equal(row["tokens"], [0, 0, 0] + list(image_example["text"]) + text + [0] * pad)
    np.testing.assert_array_equal(row["image_slot"], [0, 1, 2] + [-1] * (40 - 3))
    np.testing.assert_array_equal(row["segment_ids"], [1] * n1 + [2] * n2 + [0] * pad)
    np.testing.assert_array_equal(row["positions"], [*range(n1), *range(n2)] + [0] * pad)
    np.testing.assert_array_equal(row["prefix_end"], [3 + len(prefix)] * n1 + [n1 + 1] * n2 + [0] * pad)
    np.testing.assert_array_equal(row["targets"],
                                  [0, 0] + list(image_example["text"]) + [0] + text[1:] + [0] * (pad + 1))
    supervised_1, supervised_2 = a - len(prefix), b - 1
    np.testing.assert_allclose(row["loss_weights"], [0] * (2 + len(prefix)) + [1 / supervised_1] * supervised_1
                               + [0] + [1 / supervised_2] * supervised_2 + [0] * (pad + 1))
    assert row["loss_weights"].sum() == pytest.approx(2)  # the row's examples
    np.testing.assert_array_equal(row["images"][0], image_example["image"])
    assert row["images"].shape == (2, 4, 4, 3) and not row["images"][1].any()
    np.testing.assert_array_equal(row[SKIPPED_KEY], counters(examples=2, no_image=2))


def random_examples(count: int, image_tokens: int, text_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        length = int(rng.integers(3, text_len + 1))
        example = {"text": rng.integers(4, 100, length).astype(np.int32), "prefix_len": int(rng.integers(1, length)),
                   SKIPPED_KEY: counters(examples=1, corrupt_image=int(rng.integers(0, 3)))}
        if rng.random() < 0.8:
            example["image"] = np.full((2, 2, 3), i, np.uint8)
        examples.append(example)
    return examples


def per_example(rows: list[dict], image_tokens: int) -> list[dict]:
    """Each example's positions cut out of its row, with row-relative values made example-relative."""
    found = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            where = np.flatnonzero(row["segment_ids"] == segment)
            start, slots = where[0], row["image_slot"][where]
            first_image = slots[slots >= 0].min() if (slots >= 0).any() else None
            found.append({**{key: row[key][where] for key in ROW_KEYS},
                          "prefix_end": row["prefix_end"][where] - start,
                          "image_slot": np.where(slots >= 0, slots - (first_image or 0), -1),
                          "image": None if first_image is None else row["images"][first_image // image_tokens]})
    return found


def rows_of(examples: list[dict], layout: RowLayout) -> list[dict]:
    return list(RowIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), layout))


def test_packed_rows_give_every_example_what_one_example_per_row_gives():
    examples = random_examples(60, image_tokens=4, text_len=10)
    unpacked = rows_of(examples, RowLayout(14, 1, 4, (2, 2, 3), max_examples=1))
    packed = rows_of(examples, RowLayout(30, 3, 4, (2, 2, 3)))
    assert len(unpacked) == 60 and len(packed) < 30
    alone, together = per_example(unpacked, 4), per_example(packed, 4)
    assert len(alone) == len(together) == 60
    for i, (a, b) in enumerate(zip(alone, together)):
        for key in ("tokens", "image_slot", "positions", "prefix_end", "targets", "loss_weights"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"example {i}: {key}")
        assert (a["image"] is None) == ("image" not in examples[i])
        if a["image"] is not None:
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(b["image"], examples[i]["image"])
    for rows in (unpacked, packed):
        assert sum(row["loss_weights"].sum() for row in rows) == pytest.approx(60)
        np.testing.assert_array_equal(sum(row[SKIPPED_KEY] for row in rows),
                                      sum(example[SKIPPED_KEY] for example in examples))
    lengths = [4 * ("image" in e) + len(e["text"]) for e in examples]
    used = [int((row["segment_ids"] > 0).sum()) for row in packed]
    assert sum(used) == sum(lengths)
    first = 0  # greedy in arrival order: each row ends where the next example would overflow it
    for row, tokens in zip(packed[:-1], used):
        count = int(row["segment_ids"].max())
        images = sum("image" in e for e in examples[first:first + count + 1])
        assert tokens + lengths[first + count] > 30 or images > 3
        first += count


def write_meta_shards(root, count: int = 24) -> str:
    """Two shards of `count` samples each with img2dataset-style metadata: every 4th has similarity 0.1 (the rest
    0.5), every 6th an original image 32 px wide (the rest 128), every 5th has no colour field."""
    for shard in range(2):
        samples = []
        for i in range(count):
            meta = {"similarity": 0.1 if i % 4 == 0 else 0.5, "width": 16, "height": 16,
                    "original_width": 32 if i % 6 == 0 else 128, "original_height": 128}
            if i % 5:
                meta["colour"] = "red"
            samples.append(ShardSample(f"{shard}{i:04d}", jpeg(i), "jpg", "a red circle in the top left corner", meta))
        write_shard(str(root / f"{shard}.tar"), samples)
    return f"{root}/*.tar"


def vlm_input(synthetic_shards, sources, **overrides) -> TrainInput:
    vlm = overrides.pop("vlm", {"image_tokens": 4, "text_len": 24, "tasks": TASKS, "pack": True})
    base = dict(sources=sources, weights={name: 1.0 for name in sources}, pp="decode|resize(16)",
                tokenizer=str(synthetic_shards / "spm.model"), global_batch_size=1, seed=3, shuffle_buffer=20,
                cycle_length=2, num_workers=0, image_size=16,
                vlm=vlm_options(vlm, {name: {"text_only": name == "text"} for name in sources}))
    return TrainInput(**{**base, **overrides})


def test_filters_are_counted_per_rule_not_as_skips_and_missing_fields_are_skips(synthetic_shards, tmp_path):
    spec = write_meta_shards(tmp_path)  # per shard: 6 of 24 low similarity, 4 small (0, 6, 12, 18; 0 and 12 both)
    filters = {"similarity": {"min": 0.28}, "image_size": {"min": 64}, "caption_length": {"max": 20}}
    caption_only = {"image_tokens": 4, "text_len": 32, "tasks": {"caption": TASKS["caption"]}, "pack": True}
    opts = vlm_input(synthetic_shards, {"img": spec}, vlm=caption_only, filters=filters, num_epochs=1,
                     max_skip_fraction=0.0, skip_check_after=1)
    iterator = iter(make_train_dataset(opts))
    batches = list(iterator)
    kept = 2 * (24 - 6 - 2)  # 0 and 12 fail both rules: counted once, under similarity (the first rule)
    assert sum(b["loss_weights"].sum() for b in batches) == pytest.approx(kept)
    counts = iterator.skip_counts()
    assert counts["filtered/similarity"] == 12 and counts["filtered/image_size"] == 4
    assert counts["filtered/caption_length"] == 0
    assert sum(counts[name] for name in counts if not name.startswith("filtered/")) == 2  # shards; no skips

    colour = {**caption_only, "tasks": {"colour": TASKS["colour"]}}
    opts = vlm_input(synthetic_shards, {"img": spec}, vlm=colour, num_epochs=1, max_skip_fraction=0.5)
    iterator = iter(make_train_dataset(opts))
    examples = sum(b["loss_weights"].sum() for b in iterator)
    assert iterator.skip_counts()["missing_field"] == 2 * 5 and examples == pytest.approx(48 - 10)
    with pytest.raises(DataError, match=r"of the input was skipped, more than the limit 1.0% .*: missing_field"):
        list(make_train_dataset(vlm_input(synthetic_shards, {"img": spec}, vlm=colour, num_epochs=1,
                                          skip_check_after=10)))
    base = base_config()
    base.data.train_shards, base.data.tokenizer, base.data.filters = spec, "spm.model", {"clip_score": {"min": 1}}
    with pytest.raises(ConfigError, match=r"^unknown data.filters rule 'clip_score'; known: similarity, .*$"):
        validate(base)


def test_task_mixture_templates_and_config_errors(synthetic_shards):
    tokenizer = str(synthetic_shards / "spm.model")
    ids = Tokenizer(tokenizer).ids
    options = vlm_options({"image_tokens": 1, "text_len": 16, "tasks": TASKS})
    op = example_op(options, "decode|resize(4)", tokenizer)
    sample = {"image": jpeg(1), "caption": "a green cross", "colour": "green"}
    drawn = [op(dict(sample), np.random.default_rng(seed)) for seed in range(600)]
    captions = [list(e["text"]) == [BOS] + ids("caption") + ids(";", lower=False) + ids("a green cross") + [EOS]
                for e in drawn]
    colours = [list(e["text"]) == [BOS] + ids("what colour?") + ids(";", lower=False) + ids("green") + [EOS]
               for e in drawn]
    assert all(a != b for a, b in zip(captions, colours))  # every draw is exactly one of the two tasks
    assert 0.6 < np.mean(captions) < 0.73  # weights 2 : 1
    same = op(dict(sample), np.random.default_rng(7))  # the sample's rng decides: a restore draws the same
    np.testing.assert_array_equal(same["text"], drawn[7]["text"])
    with pytest.raises(SampleError, match="missing_field: no field 'colour'"):
        [op({"image": jpeg(1), "caption": "x"}, np.random.default_rng(seed)) for seed in range(20)]
    head, sep, suffix = [BOS, 10, 11, 12], [5], [20, 21, EOS]  # a field-driven prefix: cut after the suffix
    assert fit_text(head, sep, suffix, 8) == (head + sep + suffix, 5, False)
    assert fit_text(head, sep, suffix, 6) == ([BOS, 10, 11, 12, 5, EOS], 5, True)
    assert fit_text(head, sep, suffix, 4) == ([BOS, 10, 5, EOS], 3, True)
    too_long = {"image_tokens": 1, "text_len": 4, "tasks": {"colour": TASKS["colour"]}}
    with pytest.raises(DataError, match=r"^data.vlm task 'colour': prompt 'what colour\?' takes \d+ ids"):
        example_op(vlm_options(too_long), "decode|resize(4)", tokenizer)
    with pytest.raises(DataError, match=r"^with data.vlm, data.pp_train .* is the image preprocessing: drop tokenize"):
        example_op(options, "decode|tokenize(8)", tokenizer)
    for bad, message in (({**too_long, "pack_lenght": 9}, "unknown key 'pack_lenght'"),
                         ({"image_tokens": 1, "tasks": TASKS}, "needs 'text_len'"),
                         ({**too_long, "tasks": {"x": {"prefix": "{a.b}", "suffix": "s"}}}, "not a field name"),
                         ({**too_long, "pack": True, "pack_length": 3}, "must hold one example")):
        with pytest.raises(DataError, match=message):
            vlm_options(bad)
    config = base_config()
    config.data.train_shards, config.data.tokenizer = "x", "spm.model"
    config.data.vlm = {"image_tokens": 16, "text_len": 32, "tasks": TASKS, "pack": True}
    validate(config)  # fills the defaults in, as a ConfigDict
    assert config.data.vlm.pack_length == 4 * 16 + 32 and config.data.vlm.separator == ";"


def test_packed_pipeline_with_text_only_data_resumes_exactly(synthetic_shards):
    """3 batches, save, 3 more; a fresh pipeline restored from the (JSON) state gives the same 3 batches and
    counters. Image-text and text-only sources are mixed."""
    opts = vlm_input(synthetic_shards, {"img": f"{synthetic_shards}/train/*.tar",
                                        "text": f"{synthetic_shards}/eval/*.tar"}, global_batch_size=4)
    first = iter(make_train_dataset(opts))
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(3)]
    restored = iter(make_train_dataset(opts))
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(3))):
        assert sorted(got) == sorted(["images", *ROW_KEYS])
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    assert restored.skip_counts() == first.skip_counts()
    rows = [(segments, slots) for b in expected for segments, slots in zip(b["segment_ids"], b["image_slot"])]
    text_only = [not (slots[segments == s] >= 0).any()
                 for segments, slots in rows for s in range(1, segments.max() + 1)]
    assert expected[0]["tokens"].shape == (4, 4 * 4 + 24) and 0 < np.mean(text_only) < 1  # both kinds of example
    for pipeline in (first, restored):
        pipeline.close()
