"""launch.gke, launch.slurm and launch.sweep: golden --dry-run outputs, the JobSet's structure, the SIGTERM wrapper
and the sbatch script's requeue logic run for real in bash, submission through fake kubectl / sbatch, one-line
errors, and a real two-run local sweep of the demo trainer.

Regenerate the golden files (tests/golden/launch_cluster/) after an intended change of the output with
    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch_cluster.py
and review the diff."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # launch/ is the checkout's, not an installed package

from launch import gke, slurm, sweep  # noqa: E402
from launch.cluster_cli import RESTART_EXIT_CODES  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "launch_cluster"
TRAIN = ["python", "-m", "vlm_jax.train", "--config=configs/paper/clip_b16.py", "--workdir=gs://BUCKET/clip-b16"]
IMAGE = ["--image", "us-docker.pkg.dev/PROJECT/vlm-jax/train:latest"]
CASES = {
    "gke_tpu_v5p-256.yaml": (gke, ["--name", "clip-b16", *IMAGE, "--tpu", "v5p-256", "--max-restarts", "5"]),
    "gke_tpu_2x_v6e-256.yaml": (gke, ["--name", "clip-b16", *IMAGE, "--tpu", "v6e-256", "--slices", "2",
                                      "--queue", "multislice-queue"]),
    "gke_gpu_2x8_h100.yaml": (gke, ["--name", "clip-b16", *IMAGE, "--gpu", "h100-80gb", "--nodes", "2",
                                    "--gpus-per-node", "8", "--namespace", "training", "--service-account",
                                    "trainer", "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]),
    "slurm_2x8.sbatch": (slurm, ["--job-name", "clip-b16", "--nodes", "2", "--gpus-per-node", "8", "--gpu-type",
                                 "h100", "--partition", "gpu", "--time", "12:00:00", "--setup",
                                 "source .venv/bin/activate"]),
}
TINY = ["--config.model.image.image_size=16", "--config.model.image.width=32", "--config.model.image.depth=1",
        "--config.model.text.width=32", "--config.model.text.depth=1", "--config.model.text.vocab_size=200",
        "--config.model.embed_dim=16", "--config.batch_size=32", "--config.log_every=1",
        "--config.checkpoint_every=2", "--config.eval_every=0", "--config.optim.warmup_steps=1",
        "--config.data.shuffle_buffer=64", "--config.data.eval_batch_size=64", "--config.total_steps=2"]


def dry_run(name: str, capsys) -> str:
    module, flags = CASES[name]
    assert module.main([*flags, "--dry-run", "--", *TRAIN]) == 0
    return capsys.readouterr().out


def one_line_error(code: int, capsys, message: str) -> None:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def fake_on_path(tmp_path, monkeypatch, tool: str) -> Path:
    """Puts tests/fake_<tool> on PATH as `tool`; returns the directory it records its calls in."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"{tool}_calls"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir()
    (bin_dir / tool).symlink_to(ROOT / "tests" / f"fake_{tool}")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(f"FAKE_{tool.upper()}_LOG", str(log))
    return log


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_matches_golden(name, capsys):
    out = dry_run(name, capsys)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / name).write_text(out)
    assert out == (GOLDEN / name).read_text(), f"{name} changed; UPDATE_GOLDEN=1 regenerates it"


def replicated_job(document: dict) -> tuple[dict, dict, dict]:
    """(the replicated job, its Job spec, its pod spec) of a one-replicated-job JobSet."""
    [job] = document["spec"]["replicatedJobs"]
    return job, job["template"]["spec"], job["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("name, replicas, pods, selector, limits", [
    ("gke_tpu_v5p-256.yaml", 1, 32, {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                     "cloud.google.com/gke-tpu-topology": "4x4x8"}, {"google.com/tpu": 4}),
    ("gke_tpu_2x_v6e-256.yaml", 2, 64, {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                        "cloud.google.com/gke-tpu-topology": "16x16"}, {"google.com/tpu": 4}),
    ("gke_gpu_2x8_h100.yaml", 1, 2, {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
     {"nvidia.com/gpu": 8}),
])
def test_jobset_structure(name, replicas, pods, selector, limits, capsys):
    """Parses (YAML, and as the JSON kubectl also takes); one indexed job per slice with every host's chips; a
    restart on exit 42 or a signal, up to --max-restarts; any other exit code fails the JobSet at once."""
    document = yaml.safe_load(dry_run(name, capsys))
    assert json.loads(json.dumps(document)) == document
    assert (document["apiVersion"], document["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    job, job_spec, pod = replicated_job(document)
    assert job["replicas"] == replicas
    assert (job_spec["parallelism"], job_spec["completions"], job_spec["completionMode"]) == (pods, pods, "Indexed")
    assert pod["nodeSelector"] == selector and pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["resources"]["limits"] == limits
    assert container["command"][:2] == ["bash", "-c"] and container["args"] == TRAIN

    failure = document["spec"]["failurePolicy"]
    assert failure["maxRestarts"] == (5 if "v5p" in name else 3)
    assert failure["rules"] == [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert job_spec["backoffLimit"] == 0
    [rule] = job_spec["podFailurePolicy"]["rules"]
    codes = rule["onExitCodes"]
    assert rule["action"] == "FailJob" and codes["operator"] == "NotIn"
    assert codes["containerName"] == container["name"] and codes["values"] == sorted(RESTART_EXIT_CODES)
    assert 42 in codes["values"] and 137 in codes["values"] and not {0, 1, 2, 127} & set(codes["values"])

    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
    if "tpu" in name:
        assert env == {"VLM_JAX_AUTO_DISTRIBUTED": "1"}
        assert document["metadata"]["annotations"] == {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    else:  # the coordinator is pod 0 of job 0: <jobset>-<replicated job>-0-0.<jobset> (JobSet's headless service)
        assert env["VLM_JAX_COORDINATOR"] == f"clip-b16-{job['name']}-0-0.clip-b16:6002"
        assert env["VLM_JAX_NUM_PROCESSES"] == "2"
        assert env["VLM_JAX_PROCESS_ID"] == {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
        assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" and "VLM_JAX_AUTO_DISTRIBUTED" not in env


# A trainer stand-in: says it is ready, then on SIGTERM exits 42 (as after a save) or, unprompted, exits 3.
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
sys.exit(3)
"""


@pytest.mark.parametrize("sigterm, expected", [(True, 42), (False, 3)])
def test_gke_wrapper_forwards_sigterm_and_exit_status(sigterm, expected, capsys):
    """The container command from the JobSet, run by bash: SIGTERM to the wrapper (the pod's PID 1) reaches the
    trainer, and the trainer's exit status is the container's."""
    [container] = replicated_job(yaml.safe_load(dry_run("gke_tpu_v5p-256.yaml", capsys)))[2]["containers"]
    wrapper = subprocess.Popen([*container["command"], sys.executable, "-c", TRAINER, "30" if sigterm else "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wrapper.stdout.readline() == "ready\n"
        if sigterm:
            wrapper.send_signal(signal.SIGTERM)
        _, err = wrapper.communicate(timeout=20)
    finally:
        wrapper.kill()
    assert wrapper.returncode == expected
    assert ("SIGTERM forwarded" in err) == sigterm


def test_slurm_script_requeues_on_42_and_signals(tmp_path, capsys):
    """The generated sbatch script, checked with bash -n and then run by bash with stand-ins for srun (runs the
    task once as SLURM_PROCID 0) and scontrol: the trainer sees the coordinator / process count / id; exits 42
    and 137 requeue the job until SLURM_RESTART_COUNT reaches --max-restarts, exit 1 does not."""
    report = ("import os, sys; print(*(os.environ[k] for k in ('VLM_JAX_COORDINATOR', 'VLM_JAX_NUM_PROCESSES', "
              "'VLM_JAX_PROCESS_ID', 'SETUP_RAN')), flush=True); sys.exit(int(os.environ['TRAINER_EXIT']))")
    assert slurm.main(["--job-name", "t", "--nodes", "2", "--max-restarts", "2", "--setup", "export SETUP_RAN=yes",
                       "--dry-run", "--", sys.executable, "-c", report]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nSLURM_PROCID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\ncase "$1" in show) printf "node001\\nnode002\\n" ;; '
                                      'requeue) echo "$2" >> "$REQUEUED" ;; esac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    for exit_code, restarts, requeued in [(42, 0, True), (137, 1, True), (42, 2, False), (1, 0, False)]:
        log = tmp_path / f"requeued_{exit_code}_{restarts}"
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="node[001-002]", SLURM_JOB_NUM_NODES="2", SLURM_RESTART_COUNT=str(restarts),
                   TRAINER_EXIT=str(exit_code), REQUEUED=str(log))
        job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert job.returncode == exit_code, job.stderr
        assert job.stdout.split() == [f"node001:{4242 % 4096 + 61440}", "2", "0", "yes"]
        assert log.exists() == requeued and (not requeued or log.read_text() == "4242\n")


def test_submits_through_kubectl_and_sbatch(tmp_path, monkeypatch, capsys):
    """Without --dry-run the document goes to `kubectl apply -f -` / `sbatch` on standard input, unchanged; a
    failing kubectl's status is the launcher's."""
    kubectl_log, sbatch_log = fake_on_path(tmp_path, monkeypatch, "kubectl"), fake_on_path(tmp_path, monkeypatch,
                                                                                          "sbatch")
    for name, log, args in [("gke_gpu_2x8_h100.yaml", kubectl_log, "apply\n-f\n-\n"),
                            ("slurm_2x8.sbatch", sbatch_log, "\n")]:
        module, flags = CASES[name]
        assert module.main([*flags, "--", *TRAIN]) == 0
        assert (log / "0.args").read_text() == args
        assert (log / "0.stdin").read_text() == (GOLDEN / name).read_text()
    monkeypatch.setenv("FAKE_KUBECTL_STATUS", "1")
    assert gke.main([*CASES["gke_gpu_2x8_h100.yaml"][1], "--", *TRAIN]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--name", "x", *IMAGE, "--tpu", "v5p-255"], "unknown TPU topology 'v5p-255'; known names: v4-8,"),
    (["--name", "x", *IMAGE, "--gpu", "h100"], "unknown GPU type 'h100'; known: h100-80gb, "),
    (["--name", "Clip_B16", *IMAGE, "--gpu", "l4"], "--name 'Clip_B16' must be lower-case"),
    (["--name", "x" * 60, *IMAGE, "--tpu", "v5p-256"], "within 63 characters"),
    (["--name", "x", *IMAGE, "--tpu", "v5p-8", "--env", "NO_VALUE"], "--env 'NO_VALUE' is not KEY=VALUE"),
    (["--name", "x", *IMAGE, "--tpu", "v5p-8", "--nodes", "2"], "--nodes and --gpus-per-node go with --gpu"),
])
def test_gke_bad_input(argv, message, capsys):
    one_line_error(gke.main([*argv, "--dry-run", "--", *TRAIN]), capsys, message)


@pytest.mark.parametrize("module, flags", [(gke, CASES["gke_tpu_v5p-256.yaml"][1]),
                                           (slurm, CASES["slurm_2x8.sbatch"][1])])
def test_missing_tool_and_command(module, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl / sbatch here
    tool = "kubectl" if module is gke else "sbatch"
    one_line_error(module.main([*flags, "--", *TRAIN]), capsys, f"{tool} is not on PATH")
    one_line_error(module.main([*flags, "--dry-run"]), capsys, "no command to run")


def test_sweep_expands_to_named_runs():
    runs = sweep.expand(["optim.lr=1e-3,3e-4", "batch_size=256,512"],
                        ["python", "-m", "vlm_jax.train", "--workdir={workdir}"], "runs/grid/")
    assert [run.name for run in runs] == ["lr1e-3-batch-size256", "lr1e-3-batch-size512", "lr3e-4-batch-size256",
                                          "lr3e-4-batch-size512"]
    assert runs[1].command == ("python", "-m", "vlm_jax.train", "--workdir=runs/grid/lr1e-3-batch-size512",
                               "--config.optim.lr=1e-3", "--config.batch_size=512")
    assert sweep.run_name((("model.image.width", "0.5"), ("data.path", "gs://b/x_y"))) == "width0p5-pathgs-b-x-y"


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "optim.lr"], "--sweep 'optim.lr' is not KEY=V1,V2"),
    (["--sweep", "optim.lr=1e-3,,3e-4"], "has an empty value"),
    (["--sweep", "optim.lr=1e-3,1e-3"], "repeats a value"),
    (["--sweep", "a=1", "--sweep", "a=2"], "a key is swept twice"),
    (["--sweep", "a=1.0,1p0"], "would both be named 'a1p0'"),
    ([], "give at least one --sweep"),
])
def test_sweep_bad_input(argv, message, capsys):
    one_line_error(sweep.main([*argv, "--dry-run", "--", "train", "--workdir=/runs/{name}"]), capsys, message)


def test_sweep_needs_a_workdir_per_run(capsys):
    one_line_error(sweep.main(["--sweep", "a=1,2", "--", "train", "--workdir=/runs/one"]), capsys,
                   "must contain {workdir} or {name}")
    one_line_error(sweep.main(["--sweep", "a=1,2", "--", "train", "--workdir={workdir}"]), capsys,
                   "needs --workdir-root")


def run_sweep(*argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.sweep", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_sweep_through_gke_submits_one_jobset_per_run(tmp_path, monkeypatch):
    """The launcher-agnostic form: each run is a `launch.gke` call, with {name} in the JobSet's name and workdir
    and the run's override at the end of the trainer's arguments."""
    log = fake_on_path(tmp_path, monkeypatch, "kubectl")
    result = run_sweep("--sweep", "optim.lr=1e-3,3e-4", "--", sys.executable, "-m", "launch.gke", "--name",
                       "clip-{name}", *IMAGE, "--tpu", "v5e-16", "--", "python", "-m", "vlm_jax.train",
                       "--workdir=gs://BUCKET/sweep/{name}", env=dict(os.environ))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "sweep: 2 of 2 runs succeeded" in result.stdout
    for i, (name, lr) in enumerate([("lr1e-3", "1e-3"), ("lr3e-4", "3e-4")]):
        document = yaml.safe_load((log / f"{i}.stdin").read_text())
        assert document["metadata"]["name"] == f"clip-{name}"
        [container] = replicated_job(document)[2]["containers"]
        assert container["args"][-2:] == [f"--workdir=gs://BUCKET/sweep/{name}", f"--config.optim.lr={lr}"]
        assert f"[{name}] jobset.jobset.x-k8s.io/fake-{i} created" in result.stdout


def test_sweep_reports_failures_and_keeps_going():
    """Two runs at once; the failing one does not stop the other; the sweep's status is the failure's."""
    code = "import sys; sys.exit(int(sys.argv[-1].rpartition('=')[2]))"
    result = run_sweep("--sweep", "status=3,0", "--parallel", "2", "--", sys.executable, "-c", code, "{name}")
    assert result.returncode == 3, result.stderr
    assert "sweep: status3 ended with status 3" in result.stdout
    assert "sweep: 1 of 2 runs succeeded; failed: status3 (3)" in result.stdout


def test_sweep_stops_its_runs_on_sigterm():
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-m", "launch.sweep", "--sweep", "a=1,2", "--grace-s", "5", "--",
                                sys.executable, "-c", code, "{name}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        run_pid = int(process.stdout.readline().split()[-1])  # "[a1] PID": the first run is up
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "not finished: a1, a2" in out
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{run_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{run_pid}")


@pytest.mark.slow
def test_local_sweep_trains_each_run_in_its_workdir(synthetic_shards, tmp_path):
    """Two real runs of the demo trainer (tiny model, 2 steps) side by side, each with its own workdir and lr."""
    result = run_sweep("--sweep", "optim.lr=1e-3,3e-4", "--workdir-root", str(tmp_path), "--parallel", "2", "--",
                       sys.executable, "-m", "vlm_jax.train", f"--config=configs/demo/clip_tiny.py:{synthetic_shards}",
                       "--workdir={workdir}", *TINY, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name, lr in [("lr1e-3", 1e-3), ("lr3e-4", 3e-4)]:
        workdir = tmp_path / name
        assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == lr
        losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in losses if "loss" in line][-1] == 2
        assert f"[{name}] step 2/2" in result.stdout
