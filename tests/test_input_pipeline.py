"""The grain training pipeline: batches, exact resume in a new process (0 and 2 workers), process split,
epochs, mixtures, skip accounting on real broken shards, evaluation splits and the tokenizer."""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipelines.eval_split import load_eval_split, tokenize_class_prompts
from data_pipelines.input_pipeline import (TrainInput, default_pp_train, local_shards, make_train_dataset,
                                           mixed_samples, resolve_num_workers, shard_samples)
from data_pipelines.preprocess import COUNTERS
from data_pipelines.samples import FILTER_RULES, DataError
from data_pipelines import tokenizer as tokenizer_cli
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.webdataset import expand_shards, read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(shards, **overrides) -> TrainInput:
    base = dict(sources={"train": f"{shards}/train/*.tar"}, weights={"train": 1.0},
                pp=default_pp_train(16, 12), tokenizer=str(shards / "spm.model"), global_batch_size=8,
                seed=3, shuffle_buffer=30, cycle_length=3, num_workers=0)
    return TrainInput(**{**base, **overrides})


def keys(dataset) -> list[str]:
    return [f"{r['__source__']}/{r['__key__']}" for r in dataset if "__key__" in r]


def test_train_batches(synthetic_shards):
    iterator = iter(make_train_dataset(options(synthetic_shards)))
    batch = next(iterator)
    assert sorted(batch) == ["image", "text"]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (8, 12) and batch["text"].dtype == np.int32
    for _ in range(29):  # 240 samples: all 8 shards of the first epoch and some of the second were read
        next(iterator)
    assert 8 < iterator.skip_counts()["shards"] < 16
    iterator.close()


RESUME_CHILD = """
import hashlib, json, sys
from data_pipelines.input_pipeline import TrainInput, make_train_dataset
def fingerprints(iterator, n):
    return [hashlib.sha1(b["image"].tobytes() + b["text"].tobytes()).hexdigest() for b in
            (next(iterator) for _ in range(n))]
if __name__ == "__main__":
    opts = TrainInput(**json.loads(sys.argv[1]))
    iterator = iter(make_train_dataset(opts))
    if sys.argv[2] == "save":
        fingerprints(iterator, 7)
        state = iterator.get_state()
        json.dump({"state": state, "next": fingerprints(iterator, 125)}, sys.stdout)
    else:
        iterator.set_state(json.loads(sys.argv[3])["state"])
        json.dump({"next": fingerprints(iterator, 125)}, sys.stdout)
    iterator.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_gives_the_next_1000_samples(synthetic_shards, tmp_path, workers):
    """State saved mid-epoch (7 batches in), restored in a fresh process: the next 125 x 8 samples match."""
    script = tmp_path / "child.py"
    script.write_text(RESUME_CHILD)
    opts = dict(sources={"train": f"{synthetic_shards}/train/*.tar"}, weights={"train": 1.0},
                pp="decode_rrc(16)|flip_lr|value_range(-1, 1)|tokenize(12)|keep('image', 'text')",
                tokenizer=str(synthetic_shards / "spm.model"), global_batch_size=8, seed=5,
                shuffle_buffer=40, cycle_length=3, num_workers=workers)
    run = lambda *args: json.loads(subprocess.run(
        [sys.executable, str(script), json.dumps(opts), *args], cwd=ROOT, check=True, capture_output=True,
        text=True, timeout=300).stdout)
    uninterrupted = run("save")
    resumed = run("restore", json.dumps(uninterrupted))
    assert len(resumed["next"]) == 125 and resumed["next"] == uninterrupted["next"]


def test_process_split_has_no_overlap_and_no_loss(synthetic_shards):
    spec = f"{synthetic_shards}/train/*.tar"
    everything = expand_shards(spec)
    parts = [local_shards(spec, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == everything and len(set(sum(parts, []))) == len(everything)
    opts = options(synthetic_shards, num_epochs=1)
    per_process = [keys(shard_samples(spec, opts, process_index=i, process_count=3)) for i in range(3)]
    all_keys = sum(per_process, [])
    assert len(all_keys) == len(set(all_keys)) == 200
    with pytest.raises(DataError, match="8 shards cannot be split across 9 processes"):
        local_shards(spec, 0, 9)


def test_epochs_reshuffle_shard_order_and_cover_everything(synthetic_shards):
    opts = options(synthetic_shards, num_epochs=3, cycle_length=1)
    samples = keys(shard_samples(f"{synthetic_shards}/train/*.tar", opts, seed=1))
    epochs = [samples[i * 200:(i + 1) * 200] for i in range(3)]
    assert len(samples) == 600 and all(sorted(e) == sorted(epochs[0]) for e in epochs)
    shard_order = [[e[i].rsplit("/", 1)[0] for i in range(0, 200, 25)] for e in epochs]
    assert shard_order[0] != shard_order[1] != shard_order[2]


def test_mixture_follows_the_weights(synthetic_shards):
    opts = options(synthetic_shards, sources={"a": f"{synthetic_shards}/train/*.tar",
                                              "b": f"{synthetic_shards}/eval/*.tar"},
                   weights={"a": 0.7, "b": 0.3})
    iterator = iter(mixed_samples(opts))
    sources = Counter("/eval/" in next(iterator)["__source__"] for _ in range(5000))
    assert abs(sources[True] / 5000 - 0.3) < 0.02
    iterator.close()


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def broken_shards(root) -> str:
    """4 shards: 3 with 20 good samples each, one with 20 good and one sample of every broken kind."""
    for shard in range(4):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for i in range(20):
                add_member(tar, f"s{shard}k{i:02d}.jpg", jpeg(shard * 100 + i))
                add_member(tar, f"s{shard}k{i:02d}.txt", b"a red circle")
            if shard == 3:
                add_member(tar, "corrupt.jpg", os.urandom(500))
                add_member(tar, "corrupt.txt", b"random bytes")
                add_member(tar, "cut.jpg", jpeg(7)[:200])  # a JPEG cut short
                add_member(tar, "cut.txt", b"half an image")
                add_member(tar, "nocap.jpg", jpeg(8))
                add_member(tar, "noimage.txt", b"no image")
    return f"{root}/*.tar"


def test_bad_samples_are_counted_and_the_limit_stops_the_run(synthetic_shards, tmp_path):
    spec = broken_shards(tmp_path)
    opts = options(synthetic_shards, sources={"train": spec}, global_batch_size=4, num_epochs=1,
                   max_skip_fraction=0.5, skip_check_after=1)
    iterator = iter(make_train_dataset(opts))
    batches = list(iterator)
    assert len(batches) == 20  # all 80 good samples, nothing else
    counts = iterator.skip_counts()
    assert counts == {"shards": 4, "corrupt_image": 2, "no_image": 1, "no_caption": 1, "duplicate_key": 0,
                      "truncated_tar": 0, "unreadable_shard": 0, "stalled_shard": 0, "truncated_captions": 0,
                      "missing_field": 0, **{f"filtered/{rule}": 0 for rule in FILTER_RULES}}
    (tmp_path / "garbage.tar").write_bytes(os.urandom(4096))  # unreadable: counts as a whole average shard
    with pytest.raises(DataError, match=r"of the input was skipped, more than the limit 1.0% .*: unreadable_shard 1 "):
        list(make_train_dataset(options(synthetic_shards, sources={"train": spec}, global_batch_size=4,
                                        num_epochs=1, skip_check_after=50)))


def long_caption_shards(root) -> str:
    """2 shards x 20 samples; samples 3, 8 and 15 of shard 1 and sample 0 of shard 0 have captions far longer
    than 12 tokens; the rest are short."""
    for shard in range(2):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for i in range(20):
                long = (shard, i) in ((1, 3), (1, 8), (1, 15), (0, 0))
                caption = "a big red circle in the top left corner " * 3 if long else "a red circle"
                add_member(tar, f"s{shard}k{i:02d}.jpg", jpeg(shard * 100 + i))
                add_member(tar, f"s{shard}k{i:02d}.txt", caption.encode())
    return f"{root}/*.tar"


@pytest.mark.parametrize("pp", ["decode_rrc(16)|tokenize(12)|keep('image', 'text')",
                                "decode_rrc(16)|caption_targets(12)|keep('image', 'text_target')",
                                "decode_rrc(16)|prefix_lm(24, prompt='caption', sep=';')|keep('image', 'text')"])
def test_truncated_captions_are_counted_not_skipped_and_survive_a_restore(synthetic_shards, tmp_path, pp):
    """4 of 40 captions do not fit the text length: all 40 samples are used (a zero skip limit does not trip), and
    truncated_captions is 4, also when the iterator is restored from a state saved mid-way."""
    opts = options(synthetic_shards, sources={"train": long_caption_shards(tmp_path)}, pp=pp, global_batch_size=4,
                   num_epochs=1, max_skip_fraction=0.0, skip_check_after=1)
    iterator = iter(make_train_dataset(opts))
    assert len(list(iterator)) == 10
    counts = iterator.skip_counts()
    assert counts["truncated_captions"] == 4 and sum(counts.values()) == 2 + 4  # 2 shards, nothing skipped
    first = iter(make_train_dataset(opts))
    for _ in range(5):
        next(first)
    state = first.get_state()
    counted = first.skip_counts()["truncated_captions"]
    restored = iter(make_train_dataset(opts))
    restored.set_state(state)
    assert restored.skip_counts()["truncated_captions"] == counted
    assert len(list(restored)) == 5 and restored.skip_counts() == counts
    older = iter(make_train_dataset(opts))  # a state saved before the counter existed: it starts at 0
    older.set_state({**state, "totals": state["totals"][:COUNTERS.index("truncated_captions")]})
    assert older.skip_counts() == {**first.skip_counts(), "truncated_captions": 0}


def test_nothing_usable_stops_instead_of_spinning(tmp_path, synthetic_shards):
    for i in range(2):
        (tmp_path / f"{i}.tar").write_bytes(os.urandom(2048))
    dataset = make_train_dataset(options(synthetic_shards, sources={"train": f"{tmp_path}/*.tar"}))
    with pytest.raises(DataError, match="1000 consecutive samples or shards were unusable"):
        next(iter(dataset))


def test_worker_count(synthetic_shards):
    assert resolve_num_workers("auto") == min(len(os.sched_getaffinity(0)), 32)
    assert resolve_num_workers(3) == 3


def test_eval_split_and_prompts(synthetic_shards):
    split = load_eval_split(f"{synthetic_shards}/eval/*.tar", str(synthetic_shards / "spm.model"),
                            image_size=16, text_len=12)
    assert split["image"].shape == (48, 16, 16, 3) and list(split["label"][:3]) == [0, 1, 2]
    assert split["text"].shape == (48, 12) and (split["text"][:, 0] > 0).all()
    raw = [sample for path in expand_shards(f"{synthetic_shards}/eval/*.tar") for sample in read_shard(path)]
    assert split["key"] == [sample["__key__"] for sample in raw]  # the webdataset keys, in order
    assert split["captions"] == [[sample["caption"]] for sample in raw]  # the raw strings
    flat = [caption for captions in split["captions"] for caption in captions]
    np.testing.assert_array_equal(Tokenizer(str(synthetic_shards / "spm.model")).encode(flat, 12), split["text"])
    prompts = tokenize_class_prompts(str(synthetic_shards / "spm.model"), ["red circle", "blue square"],
                                     ["a {}.", "{}"], 12)
    assert prompts.shape == (2, 2, 12)


def test_eval_split_of_a_folder_with_and_without_captions(synthetic_shards, tmp_path):
    """An image-only folder (no captions, no labels: what a caption generator reads) loads with empty caption
    lists and file names as keys; captions beside some images line up with text and text_image."""
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.jpg", "sub/c.png"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((20, 16, 3), 70 * i, np.uint8)).save(tmp_path / name)
    tokenizer = str(synthetic_shards / "spm.model")
    split = load_eval_split(f"folder:{tmp_path}", tokenizer, image_size=16, text_len=12)
    assert split["image"].shape == (3, 16, 16, 3) and list(split["label"]) == [-1, -1, -1]
    assert split["text"].shape == (0, 12) and split["text_image"].shape == (0,)
    assert split["captions"] == [[], [], []] and split["key"] == names
    (tmp_path / "sub" / "c.txt").write_text("A Blue Square\n")
    split = load_eval_split(f"folder:{tmp_path}", tokenizer, image_size=16, text_len=12)
    assert split["captions"] == [[], [], ["A Blue Square"]] and split["key"] == names
    assert list(split["text_image"]) == [2]
    np.testing.assert_array_equal(split["text"], Tokenizer(tokenizer).encode(["a blue square"], 12))


def test_tokenizer_eos_padding_truncation_and_missing_file(synthetic_shards, tmp_path):
    tokenizer = Tokenizer(str(synthetic_shards / "spm.model"))
    ids = tokenizer.encode(["a red circle", "a big red circle in the top left corner on a dark background"], 6)
    assert ids.dtype == np.int32 and ids.shape == (2, 6)
    first = ids[0][ids[0] != tokenizer.pad_id]
    assert first[-1] == tokenizer.eos_id and np.all(ids[0][len(first):] == tokenizer.pad_id)
    assert ids[1][-1] == tokenizer.eos_id  # truncated, EOS kept last
    assert tokenizer.eos_id not in tokenizer.encode(["a red circle"], 6, add_eos=False)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: .*missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    clone = pickle.loads(pickle.dumps(tokenizer))  # grain worker processes receive it pickled
    np.testing.assert_array_equal(clone.encode(["A Red Circle"], 6), ids[:1])


def test_shards_written_by_make_shards(synthetic_shards):
    sizes = json.loads((synthetic_shards / "train" / "sizes.json").read_text())
    assert len(sizes) == 8 and sum(sizes.values()) == 200
    assert sum(len(keys(shard_samples(f"{synthetic_shards}/train/{name}", options(synthetic_shards,
                                                                                 num_epochs=1))))
               for name in sizes) == 200


def test_inspect_reports_bad_samples_by_reason(tmp_path, capsys):
    from data_pipelines import inspect
    spec = broken_shards(tmp_path)
    assert inspect.main([spec, "--show", "1"]) == 1
    out = capsys.readouterr().out
    assert "3.tar: 20 samples; bad: corrupt_image 2, no_caption 1, no_image 1" in out
    assert "corrupt_image: key corrupt" in out and "no_image: key noimage" in out
    assert "4 shards, 80 good samples, 4 bad" in out
    result = inspect.inspect([f"{tmp_path}/0.tar"], decode=False)
    assert result["totals"] == {"samples": 20} and result["reports"][0]["shown"][0]["key"] == "s0k00"


def test_two_spellings_of_the_same_shards_give_identical_batches(synthetic_shards, tmp_path, monkeypatch):
    """Augmentation seeds follow the shard's file name and the sample key, not the path as the user typed it."""
    (tmp_path / "link").symlink_to(synthetic_shards)
    monkeypatch.chdir(synthetic_shards.parent)
    spellings = [f"{synthetic_shards}/train/*.tar", f"{tmp_path}/link/train/*.tar",
                 f"{synthetic_shards.name}/train/*.tar"]
    batches = []
    for spec in spellings:
        iterator = iter(make_train_dataset(options(synthetic_shards, sources={"train": spec},
                                                   pp="decode_rrc(16, scale=(0.1, 0.5))|keep('image')")))
        batches.append(np.stack([next(iterator)["image"] for _ in range(3)]))
        iterator.close()
    np.testing.assert_array_equal(batches[0], batches[1])
    np.testing.assert_array_equal(batches[0], batches[2])


def test_keep_of_a_field_no_sample_has_stops_on_the_first_sample_with_one_line(synthetic_shards):
    dataset = make_train_dataset(options(synthetic_shards, pp="decode_rrc(16)|keep('image', 'label')"))
    with pytest.raises(DataError) as error:
        next(iter(dataset))
    assert re.fullmatch(r"preprocessing op keep\('image', 'label'\): the samples have no field label "
                        r"\(fields: __key__, .*caption, image\); fix the data.pp spec", str(error.value))


def test_tokenizer_training_reserves_bos_and_lower_cases_only_by_default(tmp_path):
    with tarfile.open(tmp_path / "0.tar", "w") as tar:
        for i, caption in enumerate(["A Red Circle", "A BLUE Square", "Big Green Disk"] * 30):
            for name, data in ((f"k{i:03d}.jpg", jpeg(i)), (f"k{i:03d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pieces = {}
    for flag in ([], ["--no-lower"]):
        out = tmp_path / f"spm{len(flag)}.model"
        assert tokenizer_cli.main(["train", "--shards", f"{tmp_path}/*.tar", "--vocab-size", "40",
                                   "--out", str(out)] + flag) == 0
        model = Tokenizer(str(out))
        assert (model.pad_id, model.eos_id, model.bos_id) == (0, 1, 3)
        pieces[bool(flag)] = "".join(model._processor.IdToPiece(i) for i in range(4, model.vocab_size))
    assert pieces[False] == pieces[False].lower() and "R" in pieces[True]
    cased = Tokenizer(str(tmp_path / "spm1.model"))
    assert 2 not in cased.encode(["A Red Circle"], 12, lower=False)  # every piece known when the case is kept


def test_batches_carry_the_decoder_fields(synthetic_shards):
    fields = ("text_input", "text_target", "text_loss_mask")
    pp = f"decode_rrc(16)|caption_targets(12)|keep('image', {', '.join(map(repr, fields))})"
    iterator = iter(make_train_dataset(options(synthetic_shards, pp=pp)))
    batch = next(iterator)
    iterator.close()
    assert sorted(batch) == sorted(("image",) + fields)
    assert all(batch[f].shape == (8, 12) and batch[f].dtype == np.int32 for f in fields)
    assert (batch["text_input"][:, 0] == 3).all()  # BOS
    np.testing.assert_array_equal(batch["text_input"][:, 1:] * batch["text_loss_mask"][:, 1:],
                                  batch["text_target"][:, :-1] * batch["text_loss_mask"][:, 1:])
    assert (batch["text_target"][batch["text_loss_mask"] == 0] == 0).all()
