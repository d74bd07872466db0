"""The captioner end to end through the command line: train (with every caption evaluator during training),
evaluate, generate; captions longer than the text length are counted."""

import json
import os

import pytest

from synthetic_data import make_data
from test_train_cli import ROOT, TINY, run

CAPPA = "configs/demo/cappa_tiny.py"
DECODER = ["--config.model.decoder.width=32", "--config.model.decoder.depth=1", "--config.model.text.max_len=8",
           "--config.data.num_workers=0", "--config.model.caption.masked_pred_prob=0.5",
           "--config.model.caption.masked_pred_start_step=5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_data(tmp_path_factory.mktemp("data"), train_samples=256, eval_samples=48,
                         samples_per_shard=128))


@pytest.mark.slow
def test_train_evaluate_generate(data_dir, tmp_path):
    workdir = tmp_path / "cappa"
    evals = "{'perplexity': {}, 'scoring_classifier': {'every': 5}, 'captioning': {'max_images': 16, 'beam': 2}}"
    trained = run("vlm_jax.train", f"--config={CAPPA}:{data_dir}", f"--workdir={workdir}", *TINY, *DECODER,
                  "--config.total_steps=10", f"--config.evals={evals}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "scoring_classifier/top1" in line] == [5, 10]  # every 5, and at the end
    last = [line for line in lines if "loss" in line][-1]
    assert last["data/truncated_captions"] > 0 and "data/skipped/truncated_captions" not in last
    assert {"token_nll", "token_accuracy", "parallel_fraction"} <= set(last)
    assert [line["parallel_fraction"] > 0 for line in lines if "loss" in line] == [False, True]  # from step 5 on
    gallery = (workdir / "gallery.html").read_text()
    assert gallery.count("<img") == 16 and "beam search (beam 2" in gallery
    assert len((workdir / "captions.jsonl").read_text().splitlines()) == 16

    evaluated = run("vlm_jax.evaluate", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((workdir / "eval_results.json").read_text())
    from_training = [line for line in lines if "perplexity/nll" in line][-1]
    assert set(results) == {"step", "perplexity/nll", "perplexity/perplexity", "scoring_classifier/top1",
                            "scoring_classifier/top5", "captioning/cider", "captioning/bleu4"}
    for key in ("perplexity/nll", "scoring_classifier/top1", "captioning/cider"):
        assert abs(results[key] - from_training[key]) < 1e-5, key

    generated = run("vlm_jax.generate", f"--workdir={workdir}", f"--images={data_dir}/eval", "--top-p=0.9",
                    f"--out={tmp_path / 'captions.jsonl'}")
    assert generated.returncode == 0, generated.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 48 and all({"key", "caption", "references"} <= set(r) for r in records)
    too_long = run("vlm_jax.generate", f"--workdir={workdir}", f"--images={data_dir}/eval", "--max-new-tokens=9")
    assert too_long.returncode == 2 and "decode length 9 is outside 1..8" in too_long.stderr
    assert os.path.isdir(ROOT)


@pytest.mark.slow
def test_vlm_train_with_answers_then_generate_with_a_prompt(data_dir, tmp_path):
    workdir = tmp_path / "vlm"
    vlm = {"image_tokens": 4, "text_len": 12, "pack": True, "pack_images": 2,
           "tasks": {"caption": {"prefix": "caption", "suffix": "{caption}"},
                     "shape": {"prefix": "what shape?", "suffix": "{shape}"}}}
    evals = {"answers": {"questions": {"shape": {"prompt": "what shape?", "answer": "{shape}"}}, "max_images": 8},
             "captioning": {"max_images": 8}}
    trained = run("vlm_jax.train", f"--config=configs/demo/vlm_tiny.py:{data_dir}", f"--workdir={workdir}", *TINY,
                  "--config.model.lm.width=32", "--config.model.lm.depth=1", "--config.total_steps=4",
                  "--config.data.num_workers=0", f"--config.data.vlm={vlm}", f"--config.evals={evals}",
                  "--config.init_from=None", "--config.optim.freeze=")  # from scratch: no stage-0 workdir
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((workdir / "eval_results.json").read_text())
    assert {"answers/shape/exact_match", "answers/exact_match", "captioning/cider"} <= set(results)
    generated = run("vlm_jax.generate", f"--workdir={workdir}", f"--images={data_dir}/eval", "--prompt=what shape?",
                    "--max-new-tokens=4", f"--out={tmp_path / 'answers.jsonl'}")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "48 answers to 'what shape?'" in generated.stdout
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 48
