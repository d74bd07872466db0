"""Config loading: overrides, validation and one-line errors naming the cause."""

import textwrap

import pytest

from vlm_jax.config import ConfigError, load_config, load_saved_config, save_config

DEMO = "configs/demo/clip_tiny.py"


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "recipe.py"
    path.write_text("from vlm_jax.config import base_config\n\ndef get_config(arg=None):\n"
                    "    c = base_config()\n    c.data.train_shards = 'x'\n    c.data.tokenizer = 'y'\n"
                    + textwrap.indent(textwrap.dedent(body), "    ") + "\n    return c\n")
    return str(path)


def test_demo_config_loads_with_arg_and_overrides():
    config = load_config(f"{DEMO}:/data/dir", ["model.embed_dim=64", "optim.lr=3e-4", "model.scan=true"])
    assert config.data.train_shards == "/data/dir/train/*.tar"
    assert (config.model.embed_dim, config.optim.lr, config.model.scan) == (64, 3e-4, True)


@pytest.mark.parametrize("spec,overrides,message", [
    ("no/such/config.py", [], "config file not found: no/such/config.py"),
    (DEMO, ["model.nonexistent=1"], "unknown config key 'model.nonexistent'"),
    (DEMO, ["modle.embed_dim=1"], "unknown config key 'modle'"),
    (DEMO, ["model.embed_dim=big"], "config key 'model.embed_dim' expects int"),
    (DEMO, ["model.scan=maybe"], "config key 'model.scan' expects bool"),
    (DEMO, ["model.loss=hinge"], "config key 'model.loss' is 'hinge'; choose from"),
    (DEMO, ["total_steps=0"], "config key 'total_steps' must be positive"),
    (DEMO, ["optim.freeze=("], "'optim.freeze' is not a valid regex"),
    (DEMO, ["embed_dim"], "must look like key=value"),
])
def test_bad_configs_fail_with_one_line_naming_the_cause(spec, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(spec, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_key_in_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_config(write_config(tmp_path, "c.optim.learning_rate = 0.1"))


def test_wrong_type_in_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be casted"):
        load_config(write_config(tmp_path, "c.batch_size = 'many'"))


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match="'data.tokenizer' is required"):
        load_config(write_config(tmp_path, "c.data.tokenizer = None"))


def test_saved_config_round_trips(tmp_path):
    config = load_config(DEMO, ["mesh.fsdp=2"])
    save_config(config, str(tmp_path / "config.json"))
    restored = load_saved_config(str(tmp_path / "config.json"))
    assert restored == config
    assert restored.sharding_rules == config.sharding_rules


def test_unreadable_config_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None)\n    return None\n")
    with pytest.raises(ConfigError, match=f"config file {path} cannot be read"):
        load_config(str(path))
