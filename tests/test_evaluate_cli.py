"""python -m vlm_jax.evaluate through main(), and run_evaluators: real orbax checkpoints of a tiny model, real
eval tar shards.

Exit 0 writes eval_results.json; bad input is one `error:` line and exit 2; NaN parameters exit 3 and write
nothing."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from vlm_jax import checkpoint, evaluate, generate
from vlm_jax.config import load_config, load_saved_config, save_config
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.evaluators import registry
from vlm_jax.evaluators.data import load_eval_data
from vlm_jax.evaluators.registry import Evaluations
from vlm_jax.tasks import get_task
from vlm_jax.train_state import init_train_state, make_state_layout

TINY = ["model.image.image_size=16", "model.image.width=32", "model.image.depth=1", "model.text.width=32",
        "model.text.depth=1", "model.text.vocab_size=200", "model.embed_dim=16", "data.eval_batch_size=16"]


def write_workdir(workdir, config, state) -> None:
    """config.json and a step-1 checkpoint, as vlm_jax.train leaves them."""
    workdir.mkdir()
    save_config(config, str(workdir / "config.json"))
    manager = checkpoint.make_manager(str(workdir), config.keep_checkpoints)
    checkpoint.save(manager, 1, state, None)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def workdirs(synthetic_shards, tmp_path_factory):
    """A workdir with a freshly initialised model, and one whose floating-point parameters are all NaN."""
    config = load_config(f"configs/demo/clip_tiny.py:{synthetic_shards}", TINY)
    mesh = make_mesh(config.mesh)
    layout = make_state_layout(get_task(config), config, mesh)
    state = init_train_state(layout, config.seed)
    nan_state = {**state, "params": jax.tree.map(lambda x: x * np.nan, state["params"])}
    root = tmp_path_factory.mktemp("evaluate")
    write_workdir(root / "finite", config, state)
    write_workdir(root / "nan", config, nan_state)
    return config, root


def with_config(workdirs, tmp_path, **data_overrides):
    """A copy of the finite workdir whose saved config has other `config.data` values."""
    config, root = workdirs
    config = config.copy_and_resolve_references()
    for key, value in data_overrides.items():
        config.data[key] = value
    shutil.copytree(root / "finite" / "checkpoints", tmp_path / "run" / "checkpoints")
    save_config(config, str(tmp_path / "run" / "config.json"))
    return tmp_path / "run"


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow
def test_finite_checkpoint_writes_results(workdirs, capsys):
    _, root = workdirs
    assert evaluate.main([f"--workdir={root / 'finite'}"]) == 0
    results = json.loads((root / "finite" / "eval_results.json").read_text())
    assert results["step"] == 1 and 0.0 <= results["zeroshot/top1"] <= 1.0
    assert 0.0 <= results["retrieval/i2t_R@1"] <= 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results


def test_nan_parameters_exit_3_without_results(workdirs, capsys):
    """Old: NaN scores ranked first (nothing is strictly above NaN), R@1 = 1.0, exit 0 and a results file."""
    _, root = workdirs
    assert evaluate.main([f"--workdir={root / 'nan'}"]) == 3
    assert "embeddings are not finite" in one_error_line(capsys)
    assert not (root / "nan" / "eval_results.json").exists()


def test_data_error_is_one_line_exit_2(workdirs, tmp_path, capsys):
    """An eval set with no usable sample raises DataError: one line, exit 2 (old: a traceback)."""
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        (tmp_path / "images" / f"{i}.txt").write_text("a red circle")
    workdir = with_config(workdirs, tmp_path, eval_shards=f"folder:{tmp_path / 'images'}")
    assert evaluate.main([f"--workdir={workdir}"]) == 2
    assert "no usable samples in the evaluation set" in one_error_line(capsys)
    assert not (workdir / "eval_results.json").exists()


def test_config_error_is_one_line_exit_2(workdirs, tmp_path, capsys):
    """data.pp_eval is read (old: ignored); a crop the model cannot take is a one-line ConfigError."""
    workdir = with_config(workdirs, tmp_path, pp_eval="decode_center_crop(8)")
    assert evaluate.main([f"--workdir={workdir}"]) == 2
    line = one_error_line(capsys)
    assert "data.pp_eval 'decode_center_crop(8)' gives images of shape (8, 8, 3)" in line
    assert "model.image.image_size is 16" in line


def test_retrieval_runs_only_where_captions_exist(workdirs, monkeypatch):
    """A label-only split (tfds ImageNet, a folder) gets zero-shot accuracy and no retrieval recall (old: recall
    over identical all-pad captions, i2t R@1 = 1.0)."""
    config, root = workdirs
    mesh = make_mesh(config.mesh)
    task = get_task(config)
    layout = make_state_layout(task, config, mesh)
    manager = checkpoint.make_manager(str(root / "finite"), config.keep_checkpoints)
    params = checkpoint.restore_params(manager, 1, layout.abstract_state)
    captioned = Evaluations(config, task, layout, mesh).run(params, 1, final=True)
    assert {"retrieval/i2t_R@1", "retrieval/t2i_R@10", "zeroshot/top1"} <= set(captioned)
    data = load_eval_data(config)
    label_only = dataclasses.replace(data, texts=data.texts[:0], text_image=data.text_image[:0])
    monkeypatch.setattr(registry, "load_eval_data", lambda *args, **kwargs: label_only)
    assert set(Evaluations(config, task, layout, mesh).run(params, 1, final=True)) == {
        "zeroshot/top1", "zeroshot/top5"}


def test_generative_requests_on_a_contrastive_workdir_fail_in_one_line(workdirs, tmp_path, capsys):
    """A captioning evaluator, or vlm_jax.generate, on a contrastive workdir names the task; so do unknown
    evaluator types and settings."""
    _, root = workdirs
    config = load_saved_config(root / "finite" / "config.json")
    for name, evals, expected in (
            ("caption", {"captioning": {}}, "evaluator 'captioning' (captioning) needs a model that can decode "
                                            "captions (a generative task: captioning, coca or vlm); this workdir's "
                                            "task is 'contrastive'"),
            ("scores", {"zs": {"type": "scoring_classifier"}}, "task is 'contrastive'"),
            ("unknown", {"bleu": {}}, "config.evals['bleu']: unknown evaluator type 'bleu'"),
            ("setting", {"zeroshot": {"beam": 4}}, "unknown setting 'beam' for a zeroshot evaluator")):
        config.evals = evals
        shutil.copytree(root / "finite", tmp_path / name)
        save_config(config, str(tmp_path / name / "config.json"))
        assert evaluate.main([f"--workdir={tmp_path / name}"]) == 2
        assert expected in one_error_line(capsys)
    assert generate.main([f"--workdir={root / 'finite'}", f"--images={tmp_path}"]) == 2
    assert "vlm_jax.generate needs a model that can decode captions" in one_error_line(capsys)
