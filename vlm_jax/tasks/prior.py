"""PRIOR token weighting (Chen et al. 2025, "Prioritizing Image-Related Tokens Enhances Vision-Language
Pre-Training"): a frozen text-only reference LM, trained on the captions alone with the same tokenizer, scores each
supervised token; tokens it predicts poorly (image-related ones) are up-weighted.

Token i of an example with k supervised tokens gets w_i = (1 - p_ref(t_i | t_<i)) ** alpha (the paper: alpha = 1),
normalised within the example to k * w_i / sum_j w_j, so a caption's weights average 1 and the example's loss is
sum_i (w_i / sum_j w_j) * nll_i in place of the plain mean over its tokens. The reference LM's parameters live in
the model as `prior_lm` (copied from the reference run by `init_from`, frozen by `optim.freeze`, and never
differentiated through: the weights are stop-gradient).

Shape key: B rows, S positions, V vocabulary.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.config import ConfigError, load_saved_config
from vlm_jax.workdir import resolve

PRIOR_MODULE = "prior_lm"


def reference_model_config(reference_workdir: str) -> ml_collections.ConfigDict:
    """The `model` config of the reference LM's run (a "vlm" run on text-only data)."""
    config = load_saved_config(resolve(reference_workdir) / "config.json")
    if config.task != "vlm":
        raise ConfigError(f"model.vlm.prior_reference {reference_workdir} is a {config.task!r} run; PRIOR needs a "
                          "text-only language model trained with task 'vlm'")
    return config.model


def check_prior_config(config: ml_collections.ConfigDict) -> None:
    """The reference LM must be copied in from its run and frozen; one line saying what is missing."""
    reference = config.model.vlm.prior_reference
    source = dict((config.init_from or {}).get(PRIOR_MODULE) or {})
    if source.get("workdir") != reference:
        raise ConfigError(f"model.vlm.prior_reference is {reference!r}: set init_from['{PRIOR_MODULE}'] = "
                          f"{{'workdir': {reference!r}, 'params': 'lm'}} so the reference LM's weights come from "
                          f"the same run (now: {source.get('workdir')!r})")
    if not config.optim.freeze or not re.search(config.optim.freeze, f"{PRIOR_MODULE}/"):
        raise ConfigError(f"model.vlm.prior_reference is set: optim.freeze must match '^{PRIOR_MODULE}/' so the "
                          "reference LM stays frozen")
    if config.model.vlm.prior_alpha <= 0:
        raise ConfigError("model.vlm.prior_alpha must be positive")


def prior_weights(reference_logits_BxSxV: jax.Array, targets_BxS: jax.Array, loss_weights_BxS: jax.Array,
                  segment_ids_BxS: jax.Array, alpha: float) -> jax.Array:
    """Per-position loss weights [B, S] that replace the plain 1 / k of each example's supervised positions by
    w_i / sum_j w_j with w = (1 - p_ref) ** alpha (examples are the (row, segment) pairs); stop-gradient."""
    logp = jax.nn.log_softmax(reference_logits_BxSxV.astype(jnp.float32), axis=-1)
    p_ref_BxS = jnp.exp(jnp.take_along_axis(logp, targets_BxS[..., None], axis=-1)[..., 0])
    supervised_BxS = loss_weights_BxS > 0
    w_BxS = jnp.where(supervised_BxS, jnp.power(jnp.clip(1 - p_ref_BxS, 0, 1), alpha), 0.0)
    rows, length = segment_ids_BxS.shape
    example_BxS = jnp.arange(rows)[:, None] * (length + 1) + segment_ids_BxS  # a unique id per (row, segment)
    totals = jax.ops.segment_sum(w_BxS.reshape(-1), example_BxS.reshape(-1), num_segments=rows * (length + 1))
    total_BxS = totals[example_BxS]
    # an example whose every token the reference predicts with certainty keeps the plain mean
    weights = jnp.where(total_BxS > 0, w_BxS / jnp.where(total_BxS > 0, total_BxS, 1), loss_weights_BxS)
    return jax.lax.stop_gradient(jnp.where(supervised_BxS, weights, 0.0))
