"""python -m vlm_jax.export on real workdirs (orbax checkpoints of the demo config, shrunk): the folder loads offline
in transformers with every key, its safetensors say format "pt", big weights shard with an index, the tokenizer and
image processor load, and bad input gets one `error:` line."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from test_evaluate_cli import TINY, write_workdir
from vlm_jax import export
from vlm_jax.config import load_config
from vlm_jax.hf import load
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout


def make_workdir(root, synthetic_shards, overrides=()):
    config = load_config(f"configs/demo/clip_tiny.py:{synthetic_shards}", [*TINY, *overrides])
    layout = make_state_layout(get_task(config), config, make_mesh(config.mesh))
    write_workdir(root, config, init_train_state(layout, config.seed))
    return config


def one_line_error(capsys, argv, expected):
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and expected in err, err


SIGLIP_SHAPED = ["model.arch=big_vision", "model.image.pool=map", "model.text.pool=last",
                 "model.image_projection=false", "model.embed_dim=32"]


def test_demo_run_exports_a_loadable_clip_folder(synthetic_shards, tmp_path, capsys):
    config = make_workdir(tmp_path / "run", synthetic_shards)
    out = tmp_path / "hf"
    assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["class"] == "CLIPModel" and summary["step"] == 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "README.md"):
        assert (out / name).is_file(), name
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert {f.get_tensor(key).dtype for key in f.keys()} == {np.dtype(np.float32)}
    model, info = transformers.AutoModel.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert type(model).__name__ == "CLIPModel"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.model_max_length == config.model.text.max_len
    processor = transformers.AutoImageProcessor.from_pretrained(out, local_files_only=True)
    pixels = processor(images=[np.zeros((40, 60, 3), np.uint8)], return_tensors="np").pixel_values
    assert pixels.shape[-2:] == (config.model.image.image_size,) * 2
    assert not (tmp_path / "hf.partial").exists()


def test_softmax_siglip_exports_sharded_with_an_index_and_zero_bias(synthetic_shards, tmp_path, capsys):
    make_workdir(tmp_path / "run", synthetic_shards, SIGLIP_SHAPED)
    out = tmp_path / "hf"
    assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={out}", "--max-shard-gb=0.0001"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, info = transformers.SiglipModel.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert float(model.logit_bias) == 0.0  # softmax-trained: the model card says so
    assert "logit_bias" in (out / "README.md").read_text()
    _, params, reader = load.load_folder(str(out))
    reader.check()


@pytest.mark.slow
def test_bad_input_gets_one_line(synthetic_shards, tmp_path, capsys):
    make_workdir(tmp_path / "gap", synthetic_shards, ["model.image.pool=gap"])
    one_line_error(capsys, [f"--workdir={tmp_path / 'gap'}", f"--out={tmp_path / 'o'}"],
                   "not CLIPModel (image pool 'gap' (CLIP pools its class token))")
    one_line_error(capsys, [f"--workdir={tmp_path / 'gap'}", f"--out={tmp_path / 'o'}", "--as=paligemma"],
                   "does not export as paligemma")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, [f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'o'}"], "has no config.json")
    make_workdir(tmp_path / "run", synthetic_shards)
    for entry in (tmp_path / "run" / "checkpoints").iterdir():
        entry.rename(tmp_path / f"moved_{entry.name}")
    one_line_error(capsys, [f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'o'}"], "no checkpoint")
    make_workdir(tmp_path / "notok", synthetic_shards, [f"data.tokenizer={tmp_path / 'missing.model'}"])
    one_line_error(capsys, [f"--workdir={tmp_path / 'notok'}", f"--out={tmp_path / 'o'}"], "missing.model")
    assert not (tmp_path / "o").exists()


def test_import_refuses_pickle_weights(tmp_path, capsys):
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))
    assert load.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pickle weights (pytorch_model.bin)" in err, err


@pytest.mark.parametrize("argv", [["--as=siglip"], ["--as=vision"]])
def test_export_kinds_are_checked_against_the_run(synthetic_shards, tmp_path, capsys, argv):
    make_workdir(tmp_path / "run", synthetic_shards)
    if argv == ["--as=siglip"]:
        one_line_error(capsys, [f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'o'}", *argv],
                       "model.arch is 'clip' (SigLIP is 'big_vision')")
    else:
        assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'o'}", *argv]) == 0
        model = transformers.AutoModel.from_pretrained(tmp_path / "o", local_files_only=True)
        assert type(model).__name__ == "CLIPVisionModel"


@pytest.mark.slow
def test_clip_architecture_trains_exports_each_step_and_matches_transformers(tmp_path):
    """A CLIP-architecture run (the demo's model.arch=clip) trains 10 steps with export_every=5; WORKDIR/hf is a CLIPModel
    whose logits on held-out images and prompts equal ours, and whose tokenizer gives our ids."""
    from test_train_cli import run, train_args
    from synthetic_data import make_data
    import jax.numpy as jnp
    from flax import nnx
    from vlm_jax.hf.export import load_run
    from data_pipelines.tokenizer import Tokenizer

    data_dir = str(make_data(tmp_path / "data", train_samples=256, eval_samples=32, samples_per_shard=128))
    workdir = tmp_path / "clip"
    result = run(*train_args(data_dir, workdir, "--config.total_steps=10", "--config.export_every=5",
                             "--config.model.embed_dim=24"))  # the demo's CLIP architecture, shrunk
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported step 5" in result.stdout + result.stderr and "exported step 10" in result.stdout + result.stderr
    hf = transformers.CLIPModel.from_pretrained(workdir / "hf", local_files_only=True)
    assert "zeroshot/top1" in (workdir / "hf" / "README.md").read_text()  # the final evaluation's results
    config, step, params = load_run(str(workdir))
    assert step == 10
    model = get_task(config).build_model(nnx.Rngs(0))
    nnx.update(model, params)
    texts = ["a red circle.", "A photo of a BLUE Square!", "there is a green triangle in the picture"]
    ours_ids = Tokenizer(config.data.tokenizer).encode(texts, config.model.text.max_len)
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf", local_files_only=True)
    hf_ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(hf_ids["input_ids"], ours_ids)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(hf_ids["input_ids"]).long(),
                    attention_mask=torch.from_numpy(hf_ids["attention_mask"]).long(),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits_per_image.numpy()
    zimg, ztxt = model.embed_image(jnp.asarray(pixels)), model.embed_text(jnp.asarray(ours_ids))
    ours = np.exp(float(model.temperature()[0])) * np.asarray(zimg) @ np.asarray(ztxt).T
    np.testing.assert_allclose(logits, ours, atol=1e-3, rtol=0)
