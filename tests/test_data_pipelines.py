"""Shards, tokenizer and the grain pipeline, on tiny data written here."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipelines.input_pipeline import (load_eval_split, local_shards, make_train_dataset,
                                           tokenize_class_prompts)
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from data_pipelines.webdataset import expand_shards, read_tar_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "data_pipelines.make_shards", "synthetic", "--out", str(out),
                    "--train-samples", "200", "--eval-samples", "48", "--image-size", "16",
                    "--samples-per-shard", "25"], cwd=ROOT, check=True, capture_output=True)
    captions = [s["txt"].decode() for p in expand_shards(f"{out}/train/*.tar") for s in read_tar_samples(p)]
    train_tokenizer(captions, str(out / "spm.model"), vocab_size=120)
    return out


def test_shards_round_trip(shards):
    sizes = json.loads((shards / "train" / "sizes.json").read_text())
    assert len(sizes) == 8 and sum(sizes.values()) == 200
    samples = read_tar_samples(str(shards / "eval" / "00000.tar"))
    assert [s["__key__"] for s in samples[:2]] == ["000000000", "000000001"]
    meta = json.loads(samples[1]["json"])
    assert meta["caption"] == samples[1]["txt"].decode() and meta["label"] == 1
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (16, 16)


def test_shard_specs(shards):
    assert expand_shards(f"{shards}/train/{{00001..00003}}.tar") == [
        f"{shards}/train/0000{i}.tar" for i in (1, 2, 3)]
    assert len(expand_shards(f"{shards}/train/00000.tar,{shards}/eval/*.tar")) == 3
    with pytest.raises(ValueError, match="no shards match"):
        expand_shards(f"{shards}/nothing/*.tar")
    with pytest.raises(FileNotFoundError, match="shard not found: .*00008.tar"):
        expand_shards(f"{shards}/train/{{00007..00099}}.tar")


def test_tokenizer_eos_padding_truncation_and_missing_file(shards, tmp_path):
    tokenizer = Tokenizer(str(shards / "spm.model"))
    ids = tokenizer.encode(["a red circle", "a big red circle in the top left corner on a dark background"], 6)
    assert ids.dtype == np.int32 and ids.shape == (2, 6)
    first = ids[0][ids[0] != tokenizer.pad_id]
    assert first[-1] == tokenizer.eos_id and np.all(ids[0][len(first):] == tokenizer.pad_id)
    assert ids[1][-1] == tokenizer.eos_id  # truncated, EOS kept last
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: .*missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    clone = pickle.loads(pickle.dumps(tokenizer))  # grain worker processes receive it pickled
    np.testing.assert_array_equal(clone.encode(["A Red Circle"], 6), ids[:1])


def dataset(shards, **kw):
    args = dict(global_batch_size=8, image_size=16, text_len=12, seed=3, shuffle_buffer=30, num_workers=0)
    return make_train_dataset(f"{shards}/train/*.tar", str(shards / "spm.model"), **{**args, **kw})


def test_train_batches(shards):
    batch = next(iter(dataset(shards)))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text"].shape == (8, 12) and batch["text"].dtype == np.int32


def test_iterator_state_resumes_the_exact_sequence(shards):
    reference = iter(dataset(shards))
    expected = [next(reference) for _ in range(63)]  # crosses shard and epoch boundaries
    interrupted = iter(dataset(shards))
    for _ in range(13):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = iter(dataset(shards))
    resumed.set_state(state)
    for want in expected[13:]:  # the next 50 batches
        got = next(resumed)
        np.testing.assert_array_equal(got["text"], want["text"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_epochs_reshuffle_shard_order(shards):
    texts = [next(iter(dataset(shards, shuffle_buffer=1, global_batch_size=25)))["text"]]
    it = iter(dataset(shards, shuffle_buffer=1, global_batch_size=25))
    epoch = [next(it)["text"] for _ in range(16)]
    assert not all(np.array_equal(a, b) for a, b in zip(epoch[:8], epoch[8:]))
    assert np.array_equal(texts[0], epoch[0])


def test_process_split_has_no_overlap_and_no_loss(shards):
    everything = expand_shards(f"{shards}/train/*.tar")
    parts = [local_shards(f"{shards}/train/*.tar", i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == everything and len(set(sum(parts, []))) == len(everything)
    with pytest.raises(ValueError, match="8 shards cannot be split across 9 processes"):
        local_shards(f"{shards}/train/*.tar", 0, 9)


def test_truncated_tar_keeps_earlier_samples(shards, tmp_path):
    data = (shards / "train" / "00000.tar").read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[:len(data) // 2])
    skipped = Counter()
    samples = read_tar_samples(str(broken), skipped)
    assert 5 < len(samples) < 25 and skipped["unreadable_shard_tail"] == 1


def test_sample_without_caption_or_image_is_skipped(tmp_path):
    path = tmp_path / "gaps.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", b"x"), ("a.txt", b"cap"), ("b.jpg", b"x"), ("c.txt", b"only text"),
                           ("d.jpg", b"x"), ("d.txt", b"  ")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skipped = Counter()
    assert [s["__key__"] for s in read_tar_samples(str(path), skipped)] == ["a"]
    assert skipped == Counter(no_caption=2, no_image=1)


def test_eval_split_and_prompts(shards):
    split = load_eval_split(f"{shards}/eval/*.tar", str(shards / "spm.model"), image_size=16, text_len=12)
    assert split["image"].shape == (48, 16, 16, 3) and list(split["label"][:3]) == [0, 1, 2]
    prompts = tokenize_class_prompts(str(shards / "spm.model"), ["red circle", "blue square"], ["a {}.", "{}"], 12)
    assert prompts.shape == (2, 2, 12)
