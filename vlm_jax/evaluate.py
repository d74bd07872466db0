"""Evaluates a workdir's newest checkpoint with the evaluators its config lists (vlm_jax/evaluators/registry.py).

    python -m vlm_jax.evaluate --workdir=DIR [--evals=NAME[,NAME]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax

from data_pipelines.samples import DataError
from vlm_jax import checkpoint
from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.evaluators.registry import Evaluations
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.tasks import get_task
from vlm_jax.train_state import make_state_layout
from vlm_jax.workdir import resolve

# Bad input: one `error:` line and exit 2, as vlm_jax.train does.
USER_ERRORS = (ConfigError, checkpoint.CheckpointMismatchError, FileNotFoundError, ValueError, DataError)


def evaluate_workdir(workdir: str, only: list[str] | None = None) -> dict[str, Any]:
    """Runs the configured evaluators (`only` these names, when given) on the newest checkpoint in `workdir` with
    the config saved there; FloatingPointError when the checkpoint's predictions are not finite."""
    root = resolve(workdir)
    config = load_saved_config(root / "config.json")
    mesh = make_mesh(config.mesh)
    task = get_task(config)
    layout = make_state_layout(task, config, mesh)
    evaluations = Evaluations(config, task, layout, mesh, root, only)  # bad settings fail before the restore
    if not evaluations:
        raise ConfigError("nothing to evaluate: set config.data.eval_shards or config.evals")
    step, params = checkpoint.restore_newest_params(workdir, config.keep_checkpoints, layout.abstract_state)
    return {"step": step, **evaluations.run(params, step, final=True, require_finite=True)}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with eval_results.json written; 2 (one `error:` line) for bad input; 3 for non-finite results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--evals", default="", help="comma-separated evaluation names (default: all configured)")
    args = parser.parse_args(argv)
    try:
        results = evaluate_workdir(args.workdir, [name for name in args.evals.split(",") if name] or None)
    except USER_ERRORS as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # grain appends traceback notes
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        (resolve(args.workdir) / "eval_results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
