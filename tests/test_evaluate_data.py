"""load_eval_data: the configured eval preprocessing is applied, the default one matches training's pixel value
range, and a split offering nothing to evaluate is a one-line ConfigError. Real tar shards and image files."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines.eval_split import default_pp_eval, load_eval_split
from vlm_jax.config import ConfigError, load_config
from vlm_jax.evaluators.data import load_eval_data

TINY = ["model.image.image_size=16", "model.text.vocab_size=200"]


def config_for(synthetic_shards, *overrides):
    return load_config(f"configs/demo/clip_tiny.py:{synthetic_shards}", [*TINY, *overrides])


def test_default_eval_keeps_uint8_like_the_default_training_spec(synthetic_shards):
    data = load_eval_data(config_for(synthetic_shards))
    assert data.images.dtype == np.uint8 and data.images.shape == (48, 16, 16, 3)  # the model maps to [-1, 1]
    assert data.has_captions and data.has_class_labels
    np.testing.assert_array_equal(data.text_image, np.arange(48))  # one caption per synthetic image


def test_default_eval_follows_a_float_training_value_range(synthetic_shards):
    """pp_train ends in value_range(0, 1): eval images must be in [0, 1] too (old: uint8 mapped to [-1, 1])."""
    pp_train = "decode_rrc(16)|flip_lr|value_range(0, 1)|tokenize(16)|keep('image', 'text')"
    assert default_pp_eval(16, pp_train) == ("decode|resize_small(16, method='bicubic')|center_crop(16)|"
                                             "value_range(0, 1)")
    data = load_eval_data(config_for(synthetic_shards, f"data.pp_train={pp_train}"))
    uint8 = load_eval_data(config_for(synthetic_shards)).images
    assert data.images.dtype == np.float32
    np.testing.assert_allclose(data.images, uint8 / 255.0, atol=1e-6)


def test_configured_pp_eval_is_applied(synthetic_shards):
    """Old: data.pp_eval was never read."""
    pp_eval = "decode_center_crop(16, crop_fraction=0.5)|value_range(-0.5, 0.5)"
    data = load_eval_data(config_for(synthetic_shards, f"data.pp_eval={pp_eval}"))
    assert data.images.dtype == np.float32 and data.images.min() >= -0.5 and data.images.max() <= 0.5
    full = load_eval_data(config_for(synthetic_shards, "data.pp_eval=decode_center_crop(16)|value_range(-0.5, 0.5)"))
    assert np.abs(data.images - full.images).mean() > 0.01  # the half-size crop is a different picture


def test_pp_crop_size_sets_the_image_size(synthetic_shards):
    split = load_eval_split(f"{synthetic_shards}/eval/*.tar", str(synthetic_shards / "spm.model"), image_size=16,
                            text_len=12, pp="decode_center_crop(8)")
    assert split["image"].shape == (48, 8, 8, 3)


def test_text_ops_in_an_eval_spec_are_a_one_line_error(synthetic_shards):
    with pytest.raises(ValueError, match=r"is an image spec: drop tokenize, keep") as error:
        load_eval_split(f"{synthetic_shards}/eval/*.tar", str(synthetic_shards / "spm.model"), image_size=16,
                        text_len=12, pp="decode_center_crop(16)|tokenize(12)|keep('image', 'text')")
    assert "\n" not in str(error.value)


def test_uncaptioned_unlabelled_folder_is_nothing_to_evaluate(synthetic_shards, tmp_path):
    """A folder of images without captions or labels: no retrieval over identical pad texts, and a one-line
    ConfigError instead of an empty evaluation."""
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
    config = config_for(synthetic_shards, f"data.eval_shards=folder:{tmp_path}")
    with pytest.raises(ConfigError, match="nothing to evaluate in folder:") as error:
        load_eval_data(config)
    assert "\n" not in str(error.value)


def test_skipped_eval_samples_are_counted(synthetic_shards, tmp_path, caplog):
    """Two good images and one corrupt: the split has two, and one warning says 1 of 3 were skipped."""
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 90 * i, np.uint8)).save(buffer, format="PNG")
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
    (tmp_path / "2.png").write_bytes(b"\x89PNG not really")
    split = load_eval_split(f"folder:{tmp_path}", str(synthetic_shards / "spm.model"), image_size=16, text_len=12)
    assert split["image"].shape[0] == 2
    assert f"evaluation set folder:{tmp_path}: 1 of 3 samples skipped" in caplog.text


def test_labels_beyond_the_class_names_are_a_config_error(synthetic_shards, tmp_path):
    """The synthetic set has 24 classes: 3 names would make most images silent misses."""
    (tmp_path / "classnames.json").write_text('["red circle", "blue square", "green triangle"]')
    config = config_for(synthetic_shards, f"data.classnames={tmp_path / 'classnames.json'}")
    with pytest.raises(ConfigError, match=r"has label 23 but .*classnames.json names only 3 classes"):
        load_eval_data(config)
