"""The decoder-only VLM: attention mask per position, suffix-only loss, packed rows equal to unpacked ones (values
and gradients), cached decoding against recomputation, PRIOR weights, and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.packing import RowLayout, make_row
from data_pipelines.preprocess import COUNTERS, SKIPPED_KEY
from vlm_jax.decoding import generate, greedy_by_recomputation
from vlm_jax.models.vlm import sequence_mask
from vlm_jax.tasks import get_task
from vlm_jax.parallel.sharding import to_global_batch
from vlm_jax.tasks.prior import prior_weights
from vlm_jax.train_state import init_train_state

from test_train_step import assert_same_history, setup, tiny_config

IMAGE_TOKENS, TEXT_LEN, VOCAB = 4, 10, 64


def vlm_config(pack=False, **mesh):
    c = tiny_config(**mesh)
    c.task = "vlm"
    c.model.image.pool = "none"
    c.model.text.vocab_size = VOCAB
    c.model.lm.size = "tiny"
    c.data.vlm = {"image_tokens": IMAGE_TOKENS, "text_len": TEXT_LEN, "pack": pack, "pack_images": 3,
                  "tasks": {"caption": {"prefix": "caption", "suffix": "{caption}"}}}
    return c


def build(config, seed=0):
    task = get_task(config)
    return task, task.build_model(nnx.Rngs(seed))


def example(rng, prefix_len, text_len, image=True):
    """A preprocessed example as the pipeline makes it: BOS, prefix ids, suffix ids, EOS."""
    text = np.concatenate([[3], rng.integers(4, VOCAB, text_len - 2), [1]]).astype(np.int32)
    out = {"text": text, "prefix_len": prefix_len, SKIPPED_KEY: np.zeros(len(COUNTERS), np.int32)}
    if image:
        out["image"] = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    return out


def examples(seed=0):
    rng = np.random.default_rng(seed)
    return [example(rng, 3, 7), example(rng, 2, 10), example(rng, 1, 5, image=False), example(rng, 4, 9),
            example(rng, 2, 4)]


def stack(rows):
    return {key: jnp.asarray(np.stack([row[key] for row in rows])) for key in rows[0] if key != SKIPPED_KEY}


def unpacked_rows(items):
    layout = RowLayout(IMAGE_TOKENS + TEXT_LEN, 1, IMAGE_TOKENS, (16, 16, 3), 1)
    return stack([make_row([item], layout) for item in items])


def packed_rows(groups):
    layout = RowLayout(3 * IMAGE_TOKENS + TEXT_LEN + 6, 3, IMAGE_TOKENS, (16, 16, 3))
    return stack([make_row(group, layout) for group in groups])


def test_attention_mask_per_position():
    """Image and prefix bidirectional within an example, the suffix causal, padding seeing nothing, and examples
    of a packed row never seeing each other."""
    items = examples()
    row = jax.tree.map(lambda x: x[0], packed_rows([items[:2]]))
    visible = np.asarray(sequence_mask(row["segment_ids"][None], row["prefix_end"][None]).dense(
        row["tokens"].shape[0], row["tokens"].shape[0]))[0]
    first_end = IMAGE_TOKENS + 7
    bidirectional = IMAGE_TOKENS + 3  # image tokens, BOS and two prefix ids
    assert visible[:bidirectional, :bidirectional].all()  # image tokens see the prefix and vice versa
    assert not visible[:bidirectional, bidirectional:].any()  # the prefix does not see the suffix
    suffix = np.arange(bidirectional, first_end)
    assert all(visible[q, :q + 1].all() and not visible[q, q + 1:].any() for q in suffix)  # causal
    second = slice(first_end, first_end + IMAGE_TOKENS + 10)
    assert not visible[second, :first_end].any() and not visible[:first_end, second].any()
    padding = np.asarray(row["segment_ids"]) == 0
    assert padding.any() and not visible[padding].any() and not visible[:, padding].any()


def loss_and_grads(task, model, batch):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        return task.loss(nnx.merge(graphdef, params), batch)[0]
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(grads)


def test_packed_rows_give_the_unpacked_loss_and_gradients():
    task, model = build(vlm_config())
    items = examples()
    packed = packed_rows([items[:2], items[2:4], items[4:]])
    assert packed["tokens"].shape[0] == 3 and unpacked_rows(items)["tokens"].shape[0] == 5
    expected, expected_grads = loss_and_grads(task, model, unpacked_rows(items))
    value, grads = loss_and_grads(task, model, packed)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_loss_is_the_suffix_only_per_example_mean_and_ignores_prefix_labels():
    task, model = build(vlm_config())
    batch = unpacked_rows(examples())
    logits = model(batch)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    targets, weights = np.asarray(batch["targets"]), np.asarray(batch["loss_weights"])
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    per_example = [nll[r][weights[r] > 0].mean() for r in range(len(targets))]
    loss, _ = task.loss(model, batch)
    np.testing.assert_allclose(float(loss), np.mean(per_example), rtol=1e-5)
    prefix = np.asarray(batch["positions"]) < np.asarray(batch["prefix_end"]) - 1
    changed = dict(batch, targets=jnp.where(prefix, 7, batch["targets"]))
    np.testing.assert_array_equal(float(task.loss(model, changed)[0]), float(loss))


def test_cached_decoding_equals_recomputation():
    config = vlm_config()
    task, model = build(config)
    rng = np.random.default_rng(3)
    prompt = jnp.asarray([[0, 3, 9, 12], [3, 5, 6, 7]], jnp.int32)  # right-aligned: left padding in row 0
    inputs = {"image": jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)), jnp.uint8), "prompt": prompt}
    cached = generate(lambda x: task.prefill(model, x, 6), lambda c, t: task.extend(model, c, t), inputs,
                      max_new_tokens=6, eos_id=1)
    recomputed = greedy_by_recomputation(lambda x, t: task.forward(model, x, t), inputs, bos_id=3,
                                         max_new_tokens=6, eos_id=1)
    np.testing.assert_array_equal(cached, recomputed)
    assert len(set(np.asarray(cached).ravel().tolist())) > 1


def test_prior_weights_follow_the_paper():
    """w = (1 - p_ref) ** alpha over an example's supervised tokens, normalised to sum 1 within the example."""
    rng = np.random.default_rng(0)
    batch = packed_rows([examples()[:2]])
    logits = jnp.asarray(rng.normal(size=(*batch["tokens"].shape, VOCAB)) * 2, jnp.float32)
    weights = np.asarray(prior_weights(logits, batch["targets"], batch["loss_weights"], batch["segment_ids"], 2.0))
    p = np.asarray(jax.nn.softmax(logits, -1))[0, np.arange(logits.shape[1]), np.asarray(batch["targets"])[0]]
    for segment in (1, 2):
        where = (np.asarray(batch["segment_ids"])[0] == segment) & (np.asarray(batch["loss_weights"])[0] > 0)
        w = (1 - p[where]) ** 2
        np.testing.assert_allclose(weights[0][where], w / w.sum(), rtol=1e-5)
    np.testing.assert_array_equal(weights[np.asarray(batch["loss_weights"]) == 0], 0)


@pytest.fixture(scope="module")
def one_device_vlm():
    return history_of_vlm(vlm_config(pack=True), jax.devices()[:1])


def history_of_vlm(config, devices, steps=3):
    """Losses and gradient norms of `steps` steps on one packed batch of 16 rows."""
    items = examples()
    batch = {key: np.asarray(value) for key, value in packed_rows([items[:2], items[2:4], items[4:], items[1:3]] * 4).items()}
    layout, sharding, step_fn = setup(config, devices)
    state, history = init_train_state(layout, 0), {"loss": [], "grad_norm": []}
    for _ in range(steps):
        state, metrics = step_fn(state, to_global_batch(batch, sharding))
        for key in history:
            history[key].append(float(metrics[key]))
    return history


def test_eight_devices_match_one_device(one_device_vlm):
    """fsdp x tensor over 8 devices, packed rows."""
    mesh = dict(data=1, fsdp=4, tensor=2)
    assert_same_history(history_of_vlm(vlm_config(pack=True, **mesh), jax.devices()), one_device_vlm)
