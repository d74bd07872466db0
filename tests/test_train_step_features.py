"""The train step's generative-ready features: the run's key, NNX variables by kind, trainable-only gradients
(LiT), and plain gradient accumulation for per-example / per-token losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_train_step import BATCH, assert_same_history, history_of, make_batch, setup, tiny_config
from vlm_jax import checkpoint
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import batch_sharding, to_global_batch
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.tasks.contrastive import ContrastiveTask
from vlm_jax.train_state import init_train_state, make_state_layout
from vlm_jax.train_step import make_train_step

LIT_FREEZE = r"^(image_encoder|image_proj)/"


class RandomProbeTask(ContrastiveTask):
    """The contrastive loss, reporting one uniform draw from the step's randomness."""

    def loss(self, model, batch, rngs=None, step=None):
        loss, metrics = super().loss(model, batch, rngs, step)
        return loss, {**metrics, "draw": jax.random.uniform(rngs.dropout())}


class CountingTask(ContrastiveTask):
    """A model with a non-parameter variable (like batch statistics): the examples it has seen."""

    def build_model(self, rngs):
        model = super().build_model(rngs)
        model.examples_seen = nnx.BatchStat(jnp.zeros((), jnp.float32))
        return model

    def loss(self, model, batch, rngs=None, step=None):
        model.examples_seen.value = model.examples_seen.value + batch["text"].shape[0]
        return super().loss(model, batch, rngs, step)


class PerTokenTask(ContrastiveTask):
    """A loss that is a token-weighted mean of per-example terms (as captioning's per-token cross-entropy):
    micro-batches must be accumulated with weights = their token counts."""

    microbatching = "accumulate"

    @staticmethod
    def loss_weight(batch):
        return jnp.sum(batch["text"] > 0)

    def loss(self, model, batch, rngs=None, step=None):
        zimg, ztxt = self.embed_pair(model, batch)
        tokens = jnp.sum(batch["text"] > 0, axis=1).astype(jnp.float32)
        per_example = jnp.sum((zimg - ztxt) ** 2, axis=1)
        return jnp.sum(tokens * per_example) / jnp.sum(tokens), {}


def setup_with(task_class, config, devices):
    mesh = make_mesh(config.mesh, devices)
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = task_class(config, mesh)
    layout = make_state_layout(task, config, mesh)
    return task, layout, sharding


def draws(step_fn, state, sharding, steps):
    values = []
    for i in range(steps):
        state, metrics = step_fn(state, to_global_batch(make_batch(i), sharding))
        values.append(float(metrics["draw"]))
    return state, values


@pytest.mark.slow
def test_step_randomness_comes_from_the_state_key_and_survives_a_restore(tmp_path):
    config = tiny_config(data=2, fsdp=2, tensor=2)
    task, layout, sharding = setup_with(RandomProbeTask, config, jax.devices())
    step_fn = make_train_step(task, layout, sharding)
    _, uninterrupted = draws(step_fn, init_train_state(layout, 0), sharding, 4)
    assert len(set(uninterrupted)) == 4  # a new draw every step

    state, first = draws(step_fn, init_train_state(layout, 0), sharding, 2)
    manager = checkpoint.make_manager(str(tmp_path), 1)
    checkpoint.save(manager, 2, state, None)
    checkpoint.finish(manager)
    manager = checkpoint.make_manager(str(tmp_path), 1)
    restored = checkpoint.restore(manager, 2, layout.abstract_state, None)
    manager.close()
    rest = [float(step_fn(restored, to_global_batch(make_batch(i), sharding))[1]["draw"]) for i in (2,)]
    assert first + rest == uninterrupted[:3]

    one_task, one_layout, one_sharding = setup_with(RandomProbeTask, tiny_config(), jax.devices()[:1])
    _, on_one_device = draws(make_train_step(one_task, one_layout, one_sharding), init_train_state(one_layout, 0),
                             one_sharding, 4)
    assert on_one_device == uninterrupted
    _, other_seed = draws(step_fn, init_train_state(layout, 1), sharding, 4)
    assert other_seed != uninterrupted


@pytest.mark.slow
def test_only_parameters_are_optimised_other_variables_are_carried():
    config = tiny_config()
    config.optim.warmup_steps = 0
    task, layout, sharding = setup_with(CountingTask, config, jax.devices()[:1])
    assert "examples_seen" not in layout.abstract_state["params"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), layout.abstract_state["model_state"]) == {
        "examples_seen": ((), jnp.float32)}
    opt_paths = [path for path, _ in leaves_with_path_str(layout.abstract_state["opt_state"])]
    assert not any("examples_seen" in path for path in opt_paths)
    step_fn = make_train_step(task, layout, sharding)
    state = init_train_state(layout, 0)
    for i in range(3):
        state, _ = step_fn(state, to_global_batch(make_batch(i), sharding))
    assert float(state["model_state"]["examples_seen"]) == 3 * BATCH


def step_flops(config):
    layout, sharding, step_fn = setup(config, jax.devices()[:1])
    batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
             for key, value in make_batch().items()}
    return step_fn.lower(layout.abstract_state, batch).compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_lit_runs_no_backward_pass_through_the_frozen_tower():
    """Full training costs ~3x forward in both towers; LiT only the image tower's forward plus 3x the text
    tower's. The old step kept the image backward alive (its gradients fed grad_norm): the same FLOPs as full."""
    full = tiny_config()
    lit = tiny_config()
    lit.optim.freeze = LIT_FREEZE
    ratio = step_flops(lit) / step_flops(full)
    print(f"LiT / full step FLOPs: {ratio:.3f}")
    assert ratio < 0.85


@pytest.mark.slow
def test_grad_norm_covers_trainable_parameters_only():
    config = tiny_config()
    config.optim.freeze = LIT_FREEZE
    layout, sharding, step_fn = setup(config, jax.devices()[:1])
    task = ContrastiveTask(config, sharding.mesh)
    state = init_train_state(layout, 0)
    batch = to_global_batch(make_batch(), sharding)
    grads = jax.grad(lambda p: task.loss(layout.merge(p), batch)[0])(state["params"])
    trained = [g for path, g in leaves_with_path_str(grads) if not path.startswith(("image_encoder/", "image_proj/"))]
    expected = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in trained)))
    _, metrics = step_fn(state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=1), dict(data=2, fsdp=2, tensor=2)])
def test_plain_accumulation_gives_the_full_batch_token_weighted_loss_and_gradients(mesh):
    config = tiny_config(**mesh)
    devices = jax.devices()[:1] if mesh == dict(data=1) else jax.devices()
    task, layout, sharding = setup_with(PerTokenTask, config, devices)
    whole = history_of(make_train_step(task, layout, sharding), layout, sharding)
    accumulated = history_of(make_train_step(task, layout, sharding, microbatches=2), layout, sharding)
    assert_same_history(accumulated, whole)
