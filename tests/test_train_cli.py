"""End to end through the command line: shards -> tokenizer -> train -> kill -9 -> resume -> evaluate,
and the one-line errors for bad input. Real processes, real tar shards, real orbax checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

DEMO = "configs/demo/clip_tiny.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.image.image_size=16", "--config.model.image.width=32", "--config.model.image.depth=1",
        "--config.model.text.width=32", "--config.model.text.depth=1", "--config.model.text.vocab_size=200",
        "--config.model.embed_dim=16", "--config.batch_size=32", "--config.log_every=5",
        "--config.checkpoint_every=5", "--config.eval_every=0", "--config.optim.warmup_steps=2",
        "--config.data.shuffle_buffer=64", "--config.data.eval_batch_size=64"]


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    made = run("data_pipelines.make_shards", "synthetic", "--out", str(out), "--train-samples", "512",
               "--eval-samples", "96", "--image-size", "16", "--samples-per-shard", "128")
    assert made.returncode == 0, made.stderr
    trained = run("data_pipelines.tokenizer", "train", "--shards", f"{out}/train/*.tar", "--vocab-size", "200",
                  "--out", f"{out}/spm.model")
    assert trained.returncode == 0, trained.stderr
    return str(out)


def train_args(data_dir, workdir, *extra):
    return ["vlm_jax.train", f"--config={DEMO}:{data_dir}", f"--workdir={workdir}", *TINY, *extra]


def assert_one_line_error(result, message):
    """Exit 2 and one `error:` line naming the cause (skipped data is also logged, as WARNING lines)."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("WARNING:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]


def final_loss(workdir) -> float:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line][-1]["loss"]


@pytest.mark.slow
def test_kill_resume_and_evaluate(data_dir, tmp_path):
    """kill -9 mid-run with 2 data workers; the resumed run ends with the uninterrupted run's exact loss,
    because the grain iterator state (workers, shuffle windows, shard offsets) is in the orbax checkpoint."""
    workers = "--config.data.num_workers=2"
    reference = run(*train_args(data_dir, tmp_path / "reference", "--config.total_steps=40", workers))
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", *train_args(data_dir, workdir, "--config.total_steps=40", workers)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "10").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGKILL)
    process.wait()

    resumed = run(*train_args(data_dir, workdir, "--config.total_steps=40", workers))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert final_loss(workdir) == final_loss(tmp_path / "reference")
    last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if "loss" in line][-1]
    assert last["data/skipped/corrupt_image"] == 0 and last["data/shards"] >= 4
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps[-1] == 40 and steps == sorted(set(steps))  # no duplicates from the killed run
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "40"
    assert any(name.startswith("events.") for name in os.listdir(workdir / "tensorboard"))

    evaluated = run("vlm_jax.evaluate", f"--workdir={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert results["step"] == 40
    assert 0.0 <= results["zeroshot/top1"] <= 1.0 and "retrieval/i2t_R@1" in results


def test_empty_shard_list(data_dir, tmp_path):
    result = run(*train_args(data_dir, tmp_path, f"--config.data.train_shards={data_dir}/nothing/*.tar"))
    assert_one_line_error(result, "no shards match")


def test_unusable_shards_stop_the_run(data_dir, tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.tar").write_bytes(os.urandom(2048))
    result = run(*train_args(data_dir, tmp_path / "run", f"--config.data.train_shards={tmp_path}/*.tar"))
    assert_one_line_error(result, "consecutive samples or shards were unusable")


def test_missing_tokenizer(data_dir, tmp_path):
    result = run(*train_args(data_dir, tmp_path, f"--config.data.tokenizer={data_dir}/missing.model"))
    assert_one_line_error(result, "tokenizer model not found")


def test_missing_config_file(tmp_path):
    result = run("vlm_jax.train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert_one_line_error(result, "config file not found: configs/nope.py")


def test_unknown_model_size(data_dir, tmp_path):
    result = run(*train_args(data_dir, tmp_path, "--config.model.image.variant=Q/8"))
    assert_one_line_error(result, "unknown model size 'Q'")


@pytest.mark.slow
def test_workdir_with_a_different_model(data_dir, tmp_path):
    first = run(*train_args(data_dir, tmp_path, "--config.total_steps=5"))
    assert first.returncode == 0, first.stderr[-3000:]
    result = run(*train_args(data_dir, tmp_path, "--config.total_steps=10", "--config.model.embed_dim=24"))
    assert_one_line_error(result, "holds a checkpoint of a different model")


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "mesh sizes {'data': 3, 'fsdp': 1, 'sequence': 1, 'tensor': 1} multiply to 3, "
                             "but there are 8 devices"),
    ("--config.batch_size=30", "batch_size 30 is not divisible by the data-parallel size 8"),
    ("--config.sharding_rules=(('batch', 'data'), ('embed', 'fsdp'))", "unknown logical axis"),
    ("--config.model.attention_impl=splash", "attention_impl 'splash' needs a tpu backend; this one is cpu"),
])
def test_bad_parallel_settings(data_dir, tmp_path, override, message):
    assert_one_line_error(run(*train_args(data_dir, tmp_path, override)), message)
