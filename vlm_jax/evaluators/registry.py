"""Evaluators by name, as the config lists them (in the spirit of big_vision's `config.evals`).

    config.evals = {
        "zeroshot": {"every": 500},                                  # type defaults to the name
        "coco_captions": {"type": "captioning", "data": "coco/{0..3}.tar", "beam": 4},
    }

Each entry: "type" (a key of EVALUATORS; default: the entry's name), "data" (an eval split; default
data.eval_shards), "every" (steps; default eval_every; 0: at the end only) and the evaluator's own settings.
`config.evals = None` runs the task's `default_evals` on data.eval_shards, those the split supports.
Metrics are written as "<entry name>/<metric>". The trainer and `vlm_jax.evaluate` know nothing else of them:
an evaluator asks the task for a prediction ("embed", "score", "decode"; evaluators/predict.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
from etils import epath
from jax.sharding import Mesh, NamedSharding

from vlm_jax.config import ConfigError
from vlm_jax.evaluators.answer_evals import AnswersEvaluator
from vlm_jax.evaluators.caption_evals import CaptioningEvaluator, PerplexityEvaluator, ScoringClassifierEvaluator
from vlm_jax.evaluators.contrastive_evals import RetrievalEvaluator, ZeroShotEvaluator
from vlm_jax.evaluators.data import EvalData, load_eval_data
from vlm_jax.evaluators.predict import require
from vlm_jax.parallel.sharding import batch_sharding, data_parallel_size
from vlm_jax.train_state import StateLayout

EVALUATORS = {cls.type: cls for cls in (RetrievalEvaluator, ZeroShotEvaluator, PerplexityEvaluator,
                                        ScoringClassifierEvaluator, CaptioningEvaluator, AnswersEvaluator)}
COMMON_KEYS = ("type", "data", "every")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    name: str
    type: str
    data: str | None
    every: int
    settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EvalEnv:
    """What every evaluator is built with."""

    task: Any
    config: ml_collections.ConfigDict
    layout: StateLayout
    mesh: Mesh
    sharding: NamedSharding
    batch_size: int
    workdir: epath.Path | None
    # Predictions shared by the evaluators of one run (e.g. image embeddings for retrieval and zero-shot);
    # cleared when a run starts.
    memo: dict = dataclasses.field(default_factory=dict)


def eval_specs(config: ml_collections.ConfigDict, task) -> tuple[list[EvalSpec], bool]:
    """(the configured evaluations, whether they are the task's defaults); one-line ConfigError for an unknown
    type or setting."""
    if config.evals is None:
        names = getattr(task, "default_evals", ())
        return [EvalSpec(name, name, None, config.eval_every, {}) for name in names], True
    specs = []
    for name, entry in config.evals.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"config.evals[{name!r}] must be a dict of settings (e.g. {{'every': 500}}), got "
                              f"{entry!r}")
        entry = dict(entry)
        kind = entry.get("type", name)
        if kind not in EVALUATORS:
            raise ConfigError(f"config.evals[{name!r}]: unknown evaluator type {kind!r}; choose from "
                              f"{tuple(EVALUATORS)}")
        unknown = set(entry) - set(COMMON_KEYS) - set(EVALUATORS[kind].settings)
        if unknown:
            raise ConfigError(f"config.evals[{name!r}]: unknown setting {sorted(unknown)[0]!r} for a {kind} "
                              f"evaluator; it takes {', '.join(COMMON_KEYS + tuple(EVALUATORS[kind].settings))}")
        every = entry.get("every", config.eval_every)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ConfigError(f"config.evals[{name!r}]['every'] must be an integer >= 0, got {every!r}")
        settings = {key: value for key, value in entry.items() if key not in COMMON_KEYS}
        specs.append(EvalSpec(name, kind, entry.get("data"), every, settings))
    return specs, False


def eval_batch_size(config: ml_collections.ConfigDict, sharding: NamedSharding) -> int:
    """The configured eval batch size rounded up to a multiple of the data-parallel size."""
    ways = data_parallel_size(sharding.mesh, config.sharding_rules)
    return -(-config.data.eval_batch_size // ways) * ways


class Evaluations:
    """The configured evaluators, built once (their jitted predict functions and data are reused)."""

    def __init__(self, config: ml_collections.ConfigDict, task, layout: StateLayout, mesh: Mesh,
                 workdir: epath.Path | None = None, only: list[str] | None = None):
        sharding = batch_sharding(mesh, config.sharding_rules)
        env = self.env = EvalEnv(task, config, layout, mesh, sharding, eval_batch_size(config, sharding), workdir)
        specs, defaults = eval_specs(config, task)
        if only:
            missing = [name for name in only if name not in {spec.name for spec in specs}]
            if missing:
                raise ConfigError(f"no evaluation named {missing[0]!r}; this config has "
                                  f"{', '.join(spec.name for spec in specs) or 'none'}")
            specs = [spec for spec in specs if spec.name in only]
        splits: dict[str | None, EvalData | None] = {}
        fields: dict[str | None, set[str]] = {}  # the .json fields each split's evaluators read
        for spec in specs:
            fields.setdefault(spec.data, set()).update(EVALUATORS[spec.type].fields(spec.settings))
        self.evaluators = []
        for spec in specs:
            kind = EVALUATORS[spec.type]
            require(task, config, kind.prediction, f"evaluator {spec.name!r} ({spec.type})")
            if spec.data not in splits:
                splits[spec.data] = load_eval_data(config, spec.data, require_content=False,
                                                   fields=tuple(sorted(fields[spec.data])))
            data = splits[spec.data]
            if data is None:
                if not defaults:
                    raise ConfigError(f"config.evals[{spec.name!r}] has no 'data' and data.eval_shards is not set")
                continue
            missing = kind.missing(data)
            if missing:
                if defaults:
                    logging.info("evaluator %s skipped: the split has no %s", spec.name, missing)
                    continue
                raise ConfigError(f"config.evals[{spec.name!r}]: a {spec.type} evaluator needs {missing} in "
                                  f"{spec.data or config.data.eval_shards}")
            self.evaluators.append((spec, kind(spec, env, data)))
        if defaults and not self.evaluators and config.data.eval_shards is not None:
            raise ConfigError(f"nothing to evaluate in {config.data.eval_shards}: none of the task's evaluators "
                              f"({', '.join(getattr(task, 'default_evals', ()))}) has the captions or class "
                              f"labels it needs")

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def due(self, step: int) -> bool:
        """Whether any evaluator runs at `step` during training."""
        return any(spec.every and step % spec.every == 0 for spec, _ in self.evaluators)

    def run(self, params, step: int, *, final: bool = False, require_finite: bool = False) -> dict[str, float]:
        """Results of the evaluators due at `step` (all of them when `final`), keyed "<name>/<metric>"."""
        results = {}
        self.env.memo.clear()
        for spec, evaluator in self.evaluators:
            if final or (spec.every and step % spec.every == 0):
                metrics = evaluator.run(params, step, require_finite=require_finite)
                results.update({f"{spec.name}/{key}": float(value) for key, value in metrics.items()})
        return results

