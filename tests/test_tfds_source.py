"""tfds_source: tiny array_record datasets built offline (no TensorFlow), read back as raw samples."""

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines.tfds_source import tfds_source  # noqa: E402

RNG = np.random.default_rng(0)
CLS_IMAGES = [RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
CLS_LABELS = [i % 5 for i in range(12)]
# Smooth pictures for the lossy JPEG set: gradients with a random colour offset.
_RAMP = np.add.outer(np.arange(16) * 4, np.arange(24) * 3)[..., None]
CAP_IMAGES = [(_RAMP + RNG.integers(0, 60, (1, 1, 3))).astype(np.uint8) for _ in range(6)]
CAPTIONS = [[f"a photo number {i}", f"another caption {i} \u00e9"] for i in range(6)]


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


CLS_PNGS = [encode(array, "PNG") for array in CLS_IMAGES]
CAP_JPEGS = [encode(array, "JPEG") for array in CAP_IMAGES]


# Encoded bytes are given to tfds.features.Image: encoding a numpy array there would need TensorFlow.
class TinyClassification(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ImageNet-style: image + ClassLabel + file name."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(16, 16, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=5),
            "file_name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i, (array, label) in enumerate(zip(CLS_IMAGES, CLS_LABELS)):
            yield i, {"image": CLS_PNGS[i], "label": label, "file_name": f"img{i}.png"}


class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """COCO-captions-style: image + Sequence({'id', 'text'}) captions."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"val": self._generate_examples()}

    def _generate_examples(self):
        for i, (array, texts) in enumerate(zip(CAP_IMAGES, CAPTIONS)):
            yield i, {"image": CAP_JPEGS[i], "image/id": i,
                      "captions": {"id": [2 * i, 2 * i + 1], "text": texts}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds"))
    for builder_class in (TinyClassification, TinyCaptions):
        builder = builder_class(data_dir=root, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return root


def test_classification_set(data_dir):
    ds = tfds_source("tiny_classification", "validation", data_dir)
    assert len(ds) == 12
    originals = []  # tfds shuffles examples when it writes them: find each sample's original by its bytes
    for index in range(len(ds)):
        sample = ds[index]
        assert set(sample) == {"__key__", "__source__", "image", "label"}
        assert sample["__key__"] == f"validation/{index}"
        assert sample["__source__"] == "tfds:tiny_classification/validation"
        assert isinstance(sample["image"], bytes) and sample["image"] in CLS_PNGS
        i = CLS_PNGS.index(sample["image"])
        originals.append(i)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["image"]))), CLS_IMAGES[i])
        assert type(sample["label"]) is int and sample["label"] == CLS_LABELS[i]
    assert sorted(originals) == list(range(12))


def test_captions_set(data_dir):
    ds = tfds_source("tiny_captions", "val", data_dir)
    assert len(ds) == 6
    originals = []
    for index in range(6):
        sample = ds[index]
        assert set(sample) == {"__key__", "__source__", "image", "caption", "captions"}
        assert sample["__source__"] == "tfds:tiny_captions/val"
        i = CAPTIONS.index(sample["captions"])
        originals.append(i)
        assert sample["caption"] == CAPTIONS[i][0]
        assert sample["image"] == CAP_JPEGS[i]  # the JPEG bytes as written, not re-encoded
        decoded = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
        assert decoded.shape == (16, 24, 3)
        assert np.abs(decoded.astype(int) - CAP_IMAGES[i]).mean() < 8  # lossy, but the same picture
    assert sorted(originals) == list(range(6))


def test_keys_and_split_slices(data_dir):
    full = tfds_source("tiny_captions", "val", data_dir)
    ds = tfds_source("tiny_captions", "val[2:5]", data_dir, caption_key="captions/text")
    assert len(ds) == 3 and ds[0]["captions"] == full[2]["captions"] and ds[0]["__key__"] == "val[2:5]/0"
    no_text = tfds_source("tiny_captions", "val", data_dir, caption_key=None)
    assert "caption" not in no_text[0] and "captions" not in no_text[0]
    file_name = tfds_source("tiny_classification", "validation", data_dir, caption_key="file_name",
                            label_key=None)
    i = CLS_PNGS.index(file_name[3]["image"])
    assert file_name[3]["caption"] == f"img{i}.png" and "label" not in file_name[3]
    with pytest.raises(ValueError, match="caption_key 'nope'"):
        tfds_source("tiny_captions", "val", data_dir, caption_key="nope")
    with pytest.raises(ValueError, match="not an integer scalar"):
        tfds_source("tiny_captions", "val", data_dir, label_key="captions/id")


def test_is_a_picklable_grain_dataset(data_dir):
    ds = tfds_source("tiny_classification", "validation", data_dir)
    ds = pickle.loads(pickle.dumps(ds))
    labels = sorted(sample["label"] for sample in ds.shuffle(seed=1))
    assert labels == sorted(CLS_LABELS)


@pytest.mark.parametrize("name,split", [("no_such_dataset", "test"), ("mnist", "test"),
                                        ("tiny_captions", "train")])
def test_missing_dataset_or_split_is_a_one_line_error(data_dir, name, split):
    before = sorted(os.listdir(data_dir))
    with pytest.raises(ValueError) as error:
        tfds_source(name, split, data_dir)
    message = str(error.value)
    assert "\n" not in message and name in message and repr(split) in message and data_dir in message
    assert sorted(os.listdir(data_dir)) == before  # nothing downloaded or created


def test_eval_split_from_tfds_and_folder_sources(data_dir, synthetic_shards, tmp_path):
    """load_eval_split reads tfds:NAME/SPLIT@DIR, folder:DIR and csv:FILE sources like tar shards."""
    from data_pipelines.eval_split import load_eval_split
    tokenizer = str(synthetic_shards / "spm.model")
    split = load_eval_split(f"tfds:tiny_classification/validation@{data_dir}", tokenizer, image_size=8, text_len=6)
    assert split["image"].shape == (12, 8, 8, 3) and sorted(split["label"]) == sorted(CLS_LABELS)
    assert split["text"].shape == (0, 6) and split["text_image"].shape == (0,)  # no captions: no retrieval
    captions = load_eval_split(f"tfds:tiny_captions/val@{data_dir}", tokenizer, image_size=8, text_len=6)
    assert captions["image"].shape[0] == len(CAPTIONS) and (captions["label"] == -1).all()
    # Every reference caption is kept (COCO has 5 per image), each pointing at its image.
    assert captions["text"].shape == (2 * len(CAPTIONS), 6) and (captions["text"][:, 0] > 0).all()
    np.testing.assert_array_equal(captions["text_image"], np.repeat(np.arange(len(CAPTIONS)), 2))
    first, second = captions["text"][0::2], captions["text"][1::2]
    assert not (first == second).all(axis=1).any()  # the two captions of an image are different texts
    for i, array in enumerate(CLS_IMAGES[:3]):
        (tmp_path / f"{i}.png").write_bytes(encode(array, "PNG"))
        (tmp_path / f"{i}.txt").write_text(f"a red circle {i}")
    (tmp_path / "list.csv").write_text("filepath,caption\n0.png,first\n2.png,third\n")
    folder = load_eval_split(f"folder:{tmp_path}", tokenizer, image_size=16, text_len=6)
    np.testing.assert_array_equal(folder["image"][1], CLS_IMAGES[1])
    assert load_eval_split(f"csv:{tmp_path}/list.csv", tokenizer, image_size=16, text_len=6)["image"].shape[0] == 2
