"""The captioner: decoder masks, the caption loss against numpy, 1 vs 8 devices, checkpoint round trip, cached
decoding against recomputation, and the task's predict functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax.decoding import SamplingConfig, beam_search, generate, greedy_by_recomputation
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.parallel.sharding import to_global_batch
from vlm_jax.tasks import get_task
from vlm_jax.tasks.caption_loss import caption_loss

from test_train_step import assert_same_history, make_batch, run_steps, tiny_config, trained_saved_restored


def captioning_config(**mesh):
    c = tiny_config(**mesh)
    c.task = "captioning"
    c.model.image.pool = "none"
    c.model.decoder.size, c.model.decoder.depth, c.model.decoder.num_heads = "mu", 2, 4
    c.model.decoder.zero_init_head = False  # a zero head makes every logit equal: nothing to compare
    c.model.caption.masked_pred_prob = 0.5
    return c


def build(config, seed=0):
    return get_task(config).build_model(nnx.Rngs(seed))


def images(batch=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, 16, 16, 3)), jnp.uint8)


@pytest.mark.slow
def test_decoder_masks_per_position():
    """Causal rows: a later position never reaches an earlier one; parallel-prediction rows: every position sees
    every other; cross-attention: every position sees every image token."""
    model = build(captioning_config())
    decoder = model.text_decoder
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
    image = model.encode_image(images(2))
    parallel = jnp.array([False, True])
    mask = MaskSpec(prefix_len_B=jnp.where(parallel, 8, 0).astype(jnp.int32))
    base = decoder.decoder(x, image, mask)
    changed = decoder.decoder(x.at[:, 5].add(1.0), image, mask)
    moved = np.abs(np.asarray(changed - base)).max(axis=-1)  # [row, position]
    assert np.all(moved[0, :5] == 0) and np.all(moved[0, 5:] > 0)  # causal
    assert np.all(moved[1] > 0)  # full
    for token in (0, image.shape[1] - 1):
        moved = np.abs(np.asarray(decoder.decoder(x, image.at[:, token].add(1.0), mask) - base)).max(axis=-1)
        assert np.all(moved > 0)
    logits = model(images(2), jnp.ones((2, 8), jnp.int32), parallel)
    mask_inputs = model(images(2), jnp.full((2, 8), 5, jnp.int32), parallel)
    np.testing.assert_array_equal(logits[1], mask_inputs[1])  # parallel rows see [MASK], not the tokens
    assert np.abs(np.asarray(logits[0] - mask_inputs[0])).max() > 0


def numpy_caption_loss(logits, targets, mask, reduction, smoothing):
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    vocab = logits.shape[-1]
    onehot = np.eye(vocab)[targets]
    soft = (1 - smoothing) * onehot + smoothing / vocab
    per_token = -(soft * logp).sum(-1) * mask
    if reduction == "example":
        return np.mean(per_token.sum(1) / mask.sum(1))
    return per_token.sum() / mask.sum()


@pytest.mark.parametrize("reduction", ["example", "token"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_matches_numpy_values_and_gradients(reduction, smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 7)) * 3
    targets = rng.integers(1, 7, (3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float64)
    loss_fn = lambda lg: caption_loss(lg, jnp.asarray(targets), jnp.asarray(mask, jnp.float32),  # noqa: E731
                                      reduction, smoothing)[0]
    loss, grads = jax.value_and_grad(loss_fn)(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(loss, numpy_caption_loss(logits, targets, mask, reduction, smoothing), rtol=1e-5)
    eps, numeric = 1e-4, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += eps
        down[index] -= eps
        numeric[index] = (numpy_caption_loss(up, targets, mask, reduction, smoothing)
                          - numpy_caption_loss(down, targets, mask, reduction, smoothing)) / (2 * eps)
    np.testing.assert_allclose(grads, numeric, atol=1e-5)
    assert np.all(np.asarray(grads)[mask == 0] == 0)  # padding carries no loss


@pytest.fixture(scope="module")
def one_device_captioning():
    return run_steps(captioning_config(), jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_eight_devices_match_one_device(one_device_captioning, mesh):
    assert_same_history(run_steps(captioning_config(**mesh), jax.devices()), one_device_captioning)


@pytest.mark.slow
def test_save_restore_gives_identical_next_steps(tmp_path):
    config = captioning_config(data=4, fsdp=2)
    config.model.caption.masked_pred_start_step = 3  # the share starts after the restore
    step_fn, sharding, state, restored = trained_saved_restored(config, tmp_path)
    fractions = []
    for i in range(2, 5):  # the parallel-prediction draws come from the restored key and step too
        batch = to_global_batch(make_batch(i), sharding)
        state, expected = step_fn(state, batch)
        restored, resumed = step_fn(restored, batch)
        assert float(resumed["loss"]) == float(expected["loss"])
        assert float(resumed["parallel_fraction"]) == float(expected["parallel_fraction"])
        fractions.append(float(expected["parallel_fraction"]))
    assert fractions[0] == 0 and max(fractions[1:]) > 0


def test_parallel_share_starts_at_its_step():
    """Before masked_pred_start_step every row is autoregressive (the loss is plain captioning's, with the same
    draws); from it on the rows are those of a share that starts at once."""
    config = captioning_config()
    config.model.caption.masked_pred_start_step = 5
    task, model, batch = get_task(config), build(config), {k: jnp.asarray(v) for k, v in make_batch(0).items()}
    plain_config = captioning_config()
    plain_config.model.caption.masked_pred_prob = 0.0
    at_once_config = captioning_config()

    def loss(task_config, step):
        return get_task(task_config).loss(model, batch, nnx.Rngs(3), step=jnp.int32(step))

    for step in (0, 4):
        (shared, metrics), (plain, _) = loss(config, step), loss(plain_config, step)
        np.testing.assert_array_equal(shared, plain)
        assert float(metrics["parallel_fraction"]) == 0
    for step in (5, 9):
        (shared, metrics), (reference, reference_metrics) = loss(config, step), loss(at_once_config, step)
        np.testing.assert_array_equal(shared, reference)
        assert float(metrics["parallel_fraction"]) == float(reference_metrics["parallel_fraction"]) > 0
    assert float(loss(config, 5)[0]) != float(loss(plain_config, 5)[0])
    assert task.loss(model, batch, nnx.Rngs(3))[0] == loss(at_once_config, 0)[0]  # no step: the share applies


@pytest.mark.parametrize("prob, start", [(0.0, 10), (0.75, -1)])
def test_bad_parallel_start_is_one_line(prob, start):
    config = captioning_config()
    config.model.caption.masked_pred_prob, config.model.caption.masked_pred_start_step = prob, start
    with pytest.raises(ValueError, match="masked_pred_start_step"):
        get_task(config)


def greedy_without_cache(task, model, pixels, length):
    """Plain greedy decoding: the whole prefix through the model at every step, EOS then padding."""
    tokens = np.zeros((len(pixels), length + 1), np.int32)
    tokens[:, 0] = task.bos_id
    done = np.zeros(len(pixels), bool)
    for t in range(length):
        choice = np.asarray(jnp.argmax(task.forward(model, pixels, jnp.asarray(tokens[:, :t + 1]))[:, t], -1))
        tokens[:, t + 1] = np.where(done, 0, choice)
        done |= choice == task.eos_id
    return tokens[:, 1:]


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_recomputation(scan):
    """Cached greedy decoding equals greedy by recomputation token for token; beam search with one beam (no
    length penalty) equals greedy; the cached logits equal the recomputed ones."""
    config = captioning_config()
    config.model.scan = scan
    task, model = get_task(config), build(config, seed=3)
    pixels, length = images(4, seed=1), 8

    def prefill(inputs):
        return task.prefill(model, inputs, length)

    def extend(cache, tokens):
        return task.extend(model, cache, tokens)

    greedy = generate(prefill, extend, pixels, max_new_tokens=length, eos_id=task.eos_id)
    np.testing.assert_array_equal(greedy, greedy_without_cache(task, model, pixels, length))
    reference = greedy_by_recomputation(lambda inputs, tokens: task.forward(model, inputs, tokens), pixels,
                                        bos_id=task.bos_id, max_new_tokens=length, eos_id=task.eos_id)
    np.testing.assert_array_equal(greedy, reference)  # the decoding module's no-cache reference
    beam1 = beam_search(prefill, extend, pixels, beam_size=1, max_new_tokens=length, eos_id=task.eos_id,
                        length_penalty=0.0)
    np.testing.assert_array_equal(beam1, greedy)
    sampled = generate(prefill, extend, pixels, max_new_tokens=length, eos_id=task.eos_id,
                       sampling=SamplingConfig(temperature=1.0, top_k=1), rng=jax.random.key(0))
    np.testing.assert_array_equal(sampled, greedy)  # top-1 sampling is greedy
    tokens = jnp.concatenate([jnp.full((4, 1), task.bos_id), greedy[:, :-1]], axis=1)
    logits, cache = prefill(pixels)
    stepped = [logits]
    for t in range(1, length):
        logits, cache = extend(cache, tokens[:, t])
        stepped.append(logits)
    np.testing.assert_allclose(np.stack(stepped, 1), task.forward(model, pixels, tokens), atol=2e-5)


def test_decode_length_beyond_the_position_table_is_one_line():
    config = captioning_config()
    model = build(config)
    with pytest.raises(ValueError, match="decode length 9 exceeds the decoder's position table of 8"):
        model.init_cache(model.encode_image(images(1)), 9)


def test_scoring_sums_the_caption_log_likelihood():
    """score_text equals the summed log-softmax of each target given BOS + the previous tokens (pads excluded)."""
    config = captioning_config()
    task, model = get_task(config), build(config)
    text = jnp.array([[5, 6, 1, 0, 0, 0, 0, 0], [7, 8, 9, 10, 1, 0, 0, 0]], jnp.int32)
    pixels = images(2)
    nll, count = task.score_text(model, task.encode_context(model, pixels), text)
    np.testing.assert_array_equal(count, [3, 5])
    inputs = jnp.concatenate([jnp.full((2, 1), task.bos_id), text[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(task.forward(model, pixels, inputs))
    for row, n in enumerate((3, 5)):
        expected = -sum(float(logp[row, t, int(text[row, t])]) for t in range(n))
        np.testing.assert_allclose(nll[row], expected, rtol=1e-5)


def test_every_synthetic_caption_names_its_colour_and_shape():
    """The demo target's check (data_pipelines.synthetic.caption_names_its_class) recognises every wording."""
    from data_pipelines.synthetic import caption_names_its_class, class_names, make_example
    rng = np.random.default_rng(0)
    captions = [(label, make_example(rng, label, 16)[1]) for label in list(range(24)) * 20]
    assert all(caption_names_its_class(caption, [class_names()[label]]) for label, caption in captions)
    assert not caption_names_its_class("a photo of a red box", ["a red disk"])
    assert not caption_names_its_class("a red circle and a blue square", ["a red circle"])


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scoring_classifier_and_perplexity_equal_direct_computation(remat):
    """The evaluators (mesh-sharded batches, prompts scored in chunks inside a jax loop) against per-pair
    score_text calls; also with rematerialised blocks (which once failed inside the loop)."""
    from vlm_jax.evaluators.caption_evals import PerplexityEvaluator, ScoringClassifierEvaluator
    from vlm_jax.evaluators.data import EvalData
    from vlm_jax.evaluators.registry import EvalEnv, EvalSpec
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.parallel.sharding import batch_sharding
    from vlm_jax.train_state import init_train_state, make_state_layout

    config = captioning_config(data=2)
    config.model.image.remat = config.model.decoder.remat = remat
    mesh = make_mesh(config.mesh, jax.devices()[:2])
    task = get_task(config)
    layout = make_state_layout(task, config, mesh)
    params = init_train_state(layout, 1)["params"]
    rng = np.random.default_rng(2)
    prompts = rng.integers(4, 60, (3, 2, 8)).astype(np.int32)  # 3 classes x 2 templates
    prompts[..., 5:] = 0
    prompts[..., 4] = 1
    texts = prompts[[0, 2, 1, 1, 0], 0]
    data = EvalData(np.asarray(images(5, seed=3)), texts, np.arange(5), np.array([0, 2, 1, 1, 0]), prompts)
    env = EvalEnv(task, config, layout, mesh, batch_sharding(mesh, config.sharding_rules), 4, None)
    scored = ScoringClassifierEvaluator(EvalSpec("s", "scoring_classifier", None, 0, {"prompt_chunk": 4}), env,
                                        data).run(params, 0)
    model = layout.merge(params)
    context = task.encode_context(model, jnp.asarray(data.images))
    nll = np.stack([np.asarray(task.score_text(model, context, jnp.broadcast_to(p, (5, 8)))[0])
                    for p in prompts.reshape(6, 8)], axis=1).reshape(5, 3, 2).mean(-1)
    assert scored["top1"] == pytest.approx(np.mean(np.argmin(nll, 1) == data.labels))
    perplexity = PerplexityEvaluator(EvalSpec("p", "perplexity", None, 0, {}), env, data).run(params, 0)
    total, count = task.score_text(model, context, jnp.asarray(texts))
    assert perplexity["nll"] == pytest.approx(float(np.sum(total) / np.sum(count)), rel=1e-5)
