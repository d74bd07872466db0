"""Optimizer from config: AdamW or Adafactor, warmup + decay schedule, clipping, decay masks, freezing."""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.config import ConfigError
from vlm_jax.pytree import leaves_with_path_str, map_with_path_str


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr`, then cosine, rsqrt, linear or constant decay."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end_lr = cfg.lr * cfg.end_lr_factor
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_factor)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, end_lr, decay_steps)
    elif cfg.decay == "rsqrt":
        timescale = max(warmup, 1)
        decay = lambda step: cfg.lr * jnp.sqrt(timescale / (jnp.maximum(step, 0) + timescale))
    else:
        decay = optax.constant_schedule(cfg.lr)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def regex_mask(params: Any, pattern: str) -> Any:
    """A tree of bools: True where the parameter's path matches `pattern`."""
    regex = re.compile(pattern)
    return map_with_path_str(lambda path, _: bool(regex.search(path)), params)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule). `params` may be abstract; only its paths are read."""
    schedule = make_schedule(cfg, total_steps)
    decay_mask = map_with_path_str(lambda _, no_decay: not no_decay, regex_mask(params, cfg.no_decay))
    if cfg.name == "adamw":
        base = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask, mu_dtype=jnp.dtype(cfg.moments_dtype))
    else:
        base = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                               weight_decay_mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), base) if cfg.grad_clip_norm else base
    if cfg.freeze:
        frozen = regex_mask(params, cfg.freeze)
        if not any(flag for _, flag in leaves_with_path_str(frozen)):
            raise ConfigError(f"optim.freeze {cfg.freeze!r} matches no parameter")
        labels = map_with_path_str(lambda _, f: "frozen" if f else "trained", frozen)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
