"""Optimizer pieces: schedules, weight-decay masks, decoupled decay, moment keys, Adafactor, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.config import ConfigError, base_config
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


DECAYED = "tower/fc/kernel"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("warmup_steps,first_lr", [(0, 1e-3), (5, 0.0)])
def test_weight_decay_is_decoupled_and_scaled_by_the_schedule(name, warmup_steps, first_lr):
    """With zero gradients, one step moves only decayed parameters, by exactly -lr(0) * weight_decay * param."""
    params = jax.tree.map(lambda x: 2.5 * x, PARAMS)
    cfg = optim_config(name=name, lr=1e-3, weight_decay=1e-4, warmup_steps=warmup_steps, decay="constant")
    tx, schedule = make_optimizer(cfg, params, 10)
    assert float(schedule(0)) == first_lr
    updates, _ = tx.update(optax.tree.zeros_like(params), tx.init(params), params)
    for path, update in leaves_with_path_str(updates):
        expected = -first_lr * 1e-4 * 2.5 if path == DECAYED else 0.0
        np.testing.assert_allclose(update, np.full(update.shape, expected, np.float32), rtol=1e-6, atol=0,
                                   err_msg=path)


SMALL = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}


def trajectory(name: str, **overrides) -> np.ndarray:
    """Parameters after three steps on fixed pseudo-random gradients."""
    cfg = optim_config(name=name, lr=0.1, decay="constant", **overrides)
    tx, _ = make_optimizer(cfg, SMALL, 10)
    params, state = SMALL, tx.init(SMALL)
    for step in range(3):
        keys = jax.random.split(jax.random.key(step), 2)
        grads = {"w": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (4,))}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])


REFUSED = {("adafactor", "eps")}  # Adafactor's own epsilon is added to the squared gradient: no counterpart


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("key,value", [("b1", 0.5), ("b2", 0.5), ("eps", 1e-3), ("moments_dtype", "bfloat16")])
def test_every_optimizer_honours_or_refuses_each_moment_key(name, key, value):
    if (name, key) in REFUSED:
        with pytest.raises(ConfigError, match=rf"^optim\.{key}=\S+ has no counterpart in {name} [^\n]*$"):
            make_optimizer(optim_config(name=name, **{key: value}), SMALL, 10)
    else:
        assert not np.allclose(trajectory(name), trajectory(name, **{key: value}), rtol=1e-6, atol=0)


def test_adafactor_b1_is_momentum_and_zero_keeps_none():
    """Adafactor's momentum is not bias-corrected: its first update is (1 - b1) times the plain one."""
    grads = {"w": jnp.arange(12.0).reshape(3, 4) - 5, "b": jnp.arange(4.0)}
    first = {}
    for b1 in (0.0, 0.75):
        tx, _ = make_optimizer(optim_config(name="adafactor", b1=b1, weight_decay=0.0), SMALL, 10)
        state = tx.init(SMALL)
        first[b1], _ = tx.update(grads, state, SMALL)
        has_momentum = any("/ema/" in f"/{path}/" for path, _ in leaves_with_path_str(state))
        assert has_momentum == bool(b1)
    jax.tree.map(lambda m, plain: np.testing.assert_allclose(m, 0.25 * plain, rtol=1e-6), first[0.75], first[0.0])


def test_adafactor_b2_caps_the_second_moment_decay():
    """v after two steps: decay 0 at step 0, then min(1 - 2**-0.8, b2) at step 1 (Zhai et al. 2021)."""
    g0, g1 = jnp.array([1.0, -2.0, 3.0, 0.5]), jnp.array([0.5, 1.0, -1.0, 2.0])
    for b2, decay in ((0.1, 0.1), (0.95, 1 - 2 ** -0.8)):
        tx, _ = make_optimizer(optim_config(name="adafactor", b2=b2, grad_clip_norm=0.0), {"b": SMALL["b"]}, 10)
        state = tx.init({"b": SMALL["b"]})
        for g in (g0, g1):
            _, state = tx.update({"b": g}, state, {"b": SMALL["b"]})
        (v,) = [leaf for path, leaf in leaves_with_path_str(state) if path.endswith("/v/b")]
        np.testing.assert_allclose(v, decay * g0 ** 2 + (1 - decay) * g1 ** 2, rtol=1e-6)


def test_adafactor_refusals_name_the_key_and_defaults_pass():
    make_optimizer(optim_config(name="adafactor"), SMALL, 10)
    with pytest.raises(ConfigError, match=r"^optim\.moments_dtype='bfloat16' has no counterpart in adafactor"):
        make_optimizer(optim_config(name="adafactor", b1=0.0, moments_dtype="bfloat16"), SMALL, 10)


@pytest.mark.parametrize("name,first_moment", [("adamw", "mu"), ("adafactor", "ema")])
def test_bfloat16_first_moment(name, first_moment):
    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    tx, _ = make_optimizer(optim_config(name=name, moments_dtype="bfloat16"), params, total_steps=10)
    state = tx.init(params)
    dtypes = {path: leaf.dtype for path, leaf in leaves_with_path_str(state) if leaf.ndim}
    assert {d for p, d in dtypes.items() if f"/{first_moment}/" in f"/{p}/"} == {jnp.dtype(jnp.bfloat16)}
    assert {d for p, d in dtypes.items() if f"/{first_moment}/" not in f"/{p}/"} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(params, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_frozen_parameters_get_no_update():
    cfg = optim_config(name="adafactor", lr=0.1, weight_decay=0.5, decay="constant", freeze=r"^tower/")
    tx, _ = make_optimizer(cfg, PARAMS, 10)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
    moved = {path: bool(np.any(u != 0)) for path, u in leaves_with_path_str(updates)}
    assert moved == {"tower/fc/kernel": False, "tower/fc/bias": False, "tower/ln/scale": False,
                     "tower/posemb": False, "embed/embedding": True, "logit_scale": True}
