"""The decoder-only VLM: attention mask per position, suffix-only loss, packed rows equal to unpacked ones (values
and gradients), cached decoding against recomputation, PRIOR weights, and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.packing import RowLayout, make_row
from data_pipelines.preprocess import COUNTERS, SKIPPED_KEY
from vlm_jax.decoding import beam_search, generate, greedy_by_recomputation
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cached_decoding_equals_recomputation_and_ignores_prompt_padding():
    """Cached greedy decoding equals recomputation; a row's answer does not depend on the left padding its prompt
    gets in a batch, with sliding-window layers (window 4) shorter than the context."""
    config = vlm_config()
    config.model.lm.window = 4
    task, model = build(config)
    rng = np.random.default_rng(3)
    image = jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
    inputs = {"image": image, "prompt": jnp.asarray([[0, 3, 9, 12], [3, 5, 6, 7]], jnp.int32)}  # row 0 padded

    def decode(inputs):
        return np.asarray(generate(lambda x: task.prefill(model, x, 6), lambda c, t: task.extend(model, c, t),
                                   inputs, max_new_tokens=6, eos_id=1))
    cached = decode(inputs)
    recomputed = greedy_by_recomputation(lambda x, t: task.forward(model, x, t), inputs, bos_id=3,
                                         max_new_tokens=6, eos_id=1)
    np.testing.assert_array_equal(cached, recomputed)
    assert len(set(cached.ravel().tolist())) > 1
    alone = decode({"image": image[:1], "prompt": jnp.asarray([[3, 9, 12]], jnp.int32)})
    np.testing.assert_array_equal(cached[:1], alone)
    beam = beam_search(lambda x: task.prefill(model, x, 6), lambda c, t: task.extend(model, c, t), inputs,
                       beam_size=1, max_new_tokens=6, eos_id=1, length_penalty=0.0)
    np.testing.assert_array_equal(np.asarray(beam), cached)
    wide = beam_search(lambda x: task.prefill(model, x, 6), lambda c, t: task.extend(model, c, t), inputs,
                       beam_size=3, max_new_tokens=6, eos_id=1)  # the cache is tiled and reordered per beam
    assert wide.shape == (2, 6)


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


@pytest.mark.slow
def test_eight_devices_match_one_device(one_device_vlm):
    """fsdp x tensor over 8 devices, packed rows."""
    mesh = dict(data=1, fsdp=4, tensor=2)
    assert_same_history(history_of_vlm(vlm_config(pack=True, **mesh), jax.devices()), one_device_vlm)


def saved_run(config, workdir, seed=7, step=1):
    """A workdir as training leaves it (saved config, a checkpoint of the seed's initial state); (layout, state)."""
    from vlm_jax import checkpoint
    from vlm_jax.config import save_config
    layout, _, _ = setup(config, jax.devices()[:1])
    state = init_train_state(layout, seed)
    save_config(config, workdir / "config.json")
    manager = checkpoint.make_manager(str(workdir), 1)
    assert checkpoint.save(manager, step, state, None)
    manager.wait_until_finished()
    manager.close()
    return layout, state


def contrastive_workdir(tmp_path, width=None):
    """A contrastive run's workdir with a GAP-pooled image tower; returns its model."""
    config = tiny_config()
    config.model.image.pool = "gap"
    config.model.image.width = width
    layout, state = saved_run(config, tmp_path)
    return layout.merge(state["params"])


def bootstrapped(config):
    from vlm_jax.param_init import initialise_from
    layout, _, _ = setup(config, jax.devices()[:1])
    state = initialise_from(init_train_state(layout, 0), config.init_from, layout, layout_mesh(layout), print)
    return layout, state


def layout_mesh(layout):
    return jax.tree.leaves(layout.shardings["params"])[0].mesh


@pytest.mark.slow
def test_initialising_from_a_contrastive_workdir_gives_its_image_embeddings(tmp_path):
    source = contrastive_workdir(tmp_path)
    config = vlm_config()
    config.init_from = {"image_encoder": {"workdir": str(tmp_path)}}
    layout, state = bootstrapped(config)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
    tokens = layout.merge(state["params"]).image_encoder(images)
    np.testing.assert_array_equal(np.asarray(tokens.mean(axis=1)), np.asarray(source.image_encoder(images)))


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_is_refused_naming_the_parameter(tmp_path):
    from vlm_jax.config import ConfigError
    contrastive_workdir(tmp_path, width=48)
    config = vlm_config()
    config.init_from = {"image_encoder": {"workdir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"^parameter 'image_encoder/encoder/blocks/0/attn/key/bias' is \(4, 12\) in "
                                          r".* \(step 1\) but \(4, 8\) in this model$"):
        bootstrapped(config)


def test_frozen_towers_are_bit_identical_after_training_steps():
    config = vlm_config(pack=True)
    config.optim.freeze, config.optim.warmup_steps = r"^(image_encoder|lm)/", 0  # stage 1: only the projector
    layout, sharding, step_fn = setup(config, jax.devices()[:1])
    state = init_train_state(layout, 0)
    items = examples()
    batch = to_global_batch({k: np.asarray(v) for k, v in packed_rows([items[:2], items[2:]] * 8).items()}, sharding)
    before = jax.device_get(state["params"])
    for _ in range(2):
        state, _ = step_fn(state, batch)
    after = jax.device_get(state["params"])
    for tower in ("image_encoder", "lm"):
        for a, b in zip(jax.tree.leaves(before[tower]), jax.tree.leaves(after[tower])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before["projector"]["fc1"]["kernel"], after["projector"]["fc1"]["kernel"])


@pytest.mark.slow
def test_prior_weighting_changes_the_loss_as_specified(tmp_path):
    """With a reference LM: each example's loss is sum_i w_i / sum_j w_j * nll_i, w = (1 - p_ref) ** alpha; the
    reference reads the text only (images do not change it) and gets no gradient."""
    from vlm_jax.config import save_config
    save_config(vlm_config(), tmp_path / "config.json")  # the reference run: same tokenizer and LM size
    config = vlm_config()
    config.model.vlm.prior_reference = str(tmp_path)
    config.init_from = {"prior_lm": {"workdir": str(tmp_path), "params": "lm"}}
    config.optim.freeze = "^prior_lm/"
    config.model.vlm.prior_alpha = alpha = 60.0  # an untrained reference's p_ref are all near 1/64: sharpen w
    task, model = build(config)
    batch = unpacked_rows(examples())
    reference = model.reference_logits(batch)
    other_images = dict(batch, images=255 - batch["images"])
    np.testing.assert_array_equal(np.asarray(model.reference_logits(other_images)), np.asarray(reference))
    p_ref = np.asarray(jax.nn.softmax(reference, -1))
    logp = np.asarray(jax.nn.log_softmax(model(batch), -1))
    targets, weights = np.asarray(batch["targets"]), np.asarray(batch["loss_weights"])
    rows = np.arange(len(targets))[:, None], np.arange(targets.shape[1])[None]
    nll, p = -logp[(*rows, targets)], p_ref[(*rows, targets)]
    w = (1 - p) ** alpha
    expected = np.mean([np.sum(w[r][weights[r] > 0] * nll[r][weights[r] > 0]) / np.sum(w[r][weights[r] > 0])
                        for r in range(len(targets))])
    loss, grads = loss_and_grads(task, model, batch)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    plain = np.mean([nll[r][weights[r] > 0].mean() for r in range(len(targets))])
    assert abs(loss - plain) > 1e-4
    graphdef, params = nnx.split(model, nnx.Param)
    prior_grads = jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), batch)[0])(params)["prior_lm"]
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(prior_grads))


def test_initialising_the_lm_from_another_run_copies_it(tmp_path):
    _, state = saved_run(vlm_config(), tmp_path, seed=5, step=3)
    config = vlm_config()
    config.init_from = {"lm": {"workdir": str(tmp_path), "params": "lm"}}
    _, copied = bootstrapped(config)
    for a, b in zip(jax.tree.leaves(state["params"]["lm"]), jax.tree.leaves(copied["params"]["lm"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rows_the_model_cannot_hold_are_refused_in_one_line():
    from vlm_jax.config import ConfigError
    config = vlm_config()
    config.data.vlm = dict(config.data.vlm, image_tokens=9)
    with pytest.raises(ConfigError, match=r"^data.vlm.image_tokens is 9 but the image encoder \(mu/8 at 16 px\) "
                                          r"gives 4 tokens per image$"):
        get_task(config)
    config = vlm_config()
    config.model.lm.max_len = 12
    with pytest.raises(ConfigError, match=r"^rows of 14 positions .* exceed model.lm.max_len 12"):
        get_task(config)
