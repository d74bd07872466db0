"""Optimizer from config: AdamW or Adafactor, warmup + decay schedule, clipping, decay masks, freezing."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.config import ConfigError, base_config
from vlm_jax.pytree import leaves_with_path_str, map_with_path_str

ADAFACTOR_DECAY_EXPONENT = 0.8  # Adafactor's second-moment decay 1 - (step + 1) ** -0.8 (Shazeer & Stern, 2018)


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
    """(optimizer, learning-rate schedule). `params` may be abstract; only its paths are read.

    The keys mean the same for every optimizer, or the optimizer refuses them with a ConfigError:
      weight_decay   decoupled decay scaled by the schedule: each step adds -lr(step) * weight_decay * param to
                     every parameter not matched by `no_decay` (PyTorch's AdamW convention; 0 during warmup step 0).
      b1             decay of the first moment (AdamW's mu, bias-corrected; Adafactor's momentum, not
                     bias-corrected as in optax; b1=0 keeps no momentum).
      b2             decay of the second moment (AdamW's nu; for Adafactor the cap on its 1 - (step+1)^-0.8
                     schedule, as in Zhai et al. 2021).
      eps            AdamW's denominator term; Adafactor has no counterpart and refuses a non-default value.
      moments_dtype  dtype of the first moment (the second moment stays float32); Adafactor with b1=0 refuses
                     a non-default value.
    """
    schedule = make_schedule(cfg, total_steps)
    decay_mask = map_with_path_str(lambda _, no_decay: not no_decay, regex_mask(params, cfg.no_decay))
    if cfg.name == "adamw":
        base = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask, mu_dtype=jnp.dtype(cfg.moments_dtype))
    else:
        base = adafactor(cfg, schedule, decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), base) if cfg.grad_clip_norm else base
    if cfg.freeze:
        frozen = regex_mask(params, cfg.freeze)
        if not any(flag for _, flag in leaves_with_path_str(frozen)):
            raise ConfigError(f"optim.freeze {cfg.freeze!r} matches no parameter")
        labels = map_with_path_str(lambda _, f: "frozen" if f else "trained", frozen)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def adafactor(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
              decay_mask: Any) -> optax.GradientTransformation:
    """optax's Adafactor (factored second moment, block-rms clipping, parameter scaling) with the config's
    b1 as momentum, b2 as the cap on the second-moment decay, and AdamW's decoupled weight decay."""
    refuse_unless_default(cfg, "eps", "adafactor adds its own epsilon (1e-30) to the squared gradient")
    if not cfg.b1:
        refuse_unless_default(cfg, "moments_dtype", "adafactor with optim.b1=0 keeps no first moment")

    def second_moment_decay(step: jax.Array, exponent: float) -> jax.Array:
        return jnp.minimum(1.0 - (step + 1.0) ** -exponent, cfg.b2)

    momentum = [optax.ema(cfg.b1, debias=False, accumulator_dtype=jnp.dtype(cfg.moments_dtype))] if cfg.b1 else []
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=ADAFACTOR_DECAY_EXPONENT, decay_rate_fn=second_moment_decay),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
        *momentum,
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def refuse_unless_default(cfg: ml_collections.ConfigDict, key: str, reason: str) -> None:
    """ConfigError naming `optim.<key>` unless it holds its base_config default."""
    default = base_config().optim[key]
    if cfg[key] != default:
        raise ConfigError(f"optim.{key}={cfg[key]!r} has no counterpart in {cfg.name} ({reason}); "
                          f"leave it at {default!r}")
