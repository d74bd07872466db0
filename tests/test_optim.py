"""Optimizer pieces: schedules, weight-decay masks, Adafactor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.config import base_config
from vlm_jax.optim import make_optimizer, make_schedule, regex_mask
from vlm_jax.pytree import leaves_with_path_str

PARAMS = {"tower": {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(3)},
                    "posemb": jnp.ones((2, 3))},
          "embed": {"embedding": jnp.ones((5, 3))}, "logit_scale": jnp.ones(())}


def optim_config(**kw):
    c = base_config().optim
    for key, value in kw.items():
        c[key] = value
    return c


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant"])
def test_schedule_warms_up_linearly_then_decays(decay):
    schedule = make_schedule(optim_config(lr=1.0, warmup_steps=10, decay=decay), total_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    if decay == "constant":
        assert schedule(100) == 1.0
    else:
        assert schedule(60) < 1.0 and schedule(110) <= schedule(60)
    if decay in ("cosine", "linear"):
        assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_no_decay_mask_covers_biases_norms_embeddings_and_temperature():
    mask = dict(leaves_with_path_str(regex_mask(PARAMS, base_config().optim.no_decay)))
    assert mask == {"tower/fc/kernel": False, "tower/fc/bias": True, "tower/ln/scale": True,
                    "tower/posemb": True, "embed/embedding": True, "logit_scale": True}


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_touches_only_decayed_parameters(name):
    """With zero gradients, only weight decay moves parameters."""
    tx, _ = make_optimizer(optim_config(name=name, lr=0.1, weight_decay=0.5, decay="constant"), PARAMS, 10)
    zeros = optax.tree.zeros_like(PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    moved = {path: bool(np.any(u != 0)) for path, u in leaves_with_path_str(updates)}
    assert moved == {"tower/fc/kernel": True, "tower/fc/bias": False, "tower/ln/scale": False,
                     "tower/posemb": False, "embed/embedding": False, "logit_scale": False}


def test_bfloat16_first_moment():
    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    tx, _ = make_optimizer(optim_config(moments_dtype="bfloat16"), params, total_steps=10)
    state = tx.init(params)
    dtypes = {path: leaf.dtype for path, leaf in leaves_with_path_str(state) if leaf.ndim}
    assert {d for p, d in dtypes.items() if "/mu/" in f"/{p}/"} == {jnp.dtype(jnp.bfloat16)}
    assert {d for p, d in dtypes.items() if "/nu/" in f"/{p}/"} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(params, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
