"""CoCa: the loss against numpy (values and gradients), the masks (CLS sees no padding, causality, every caption
query reaches the decoder), KV-cached decoding equal to recomputation, micro-batching with full-batch negatives
equal to the whole batch, LiT, logical axis names, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax.train_state  # noqa: F401  (flax_always_shard_variable False, before any model is built)
from test_train_step import assert_same_history
from vlm_jax.config import base_config
from vlm_jax.decoding import decoder_from_forward, generate
from vlm_jax.flops import coca_train_flops_per_sample
from vlm_jax.microbatch import cached_embedding_grads
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.sharding import batch_sharding, to_global_batch
from vlm_jax.pytree import leaves_with_path_str
from vlm_jax.tasks.caption_loss import teacher_forcing
from vlm_jax.tasks.coca import CocaTask
from vlm_jax.train_state import init_train_state, make_state_layout
from vlm_jax.train_step import make_train_step

BATCH, LENGTH, VOCAB, QUERIES = 8, 8, 64, 4


def tiny_config(**mesh):
    c = base_config()
    c.task = "coca"
    c.model.image.variant, c.model.image.image_size = "mu/8", 16
    c.model.text.size, c.model.text.vocab_size, c.model.text.max_len = "mu", VOCAB, LENGTH
    c.model.decoder.size, c.model.decoder.zero_init_head = "mu", False  # non-zero logits from the start
    c.model.text.depth = c.model.decoder.depth = 2
    c.model.image.num_heads = c.model.text.num_heads = c.model.decoder.num_heads = 4
    c.model.embed_dim, c.model.coca.caption_queries = 16, QUERIES
    c.model.coca.contrastive_weight, c.model.coca.caption_weight = 0.7, 1.3
    c.batch_size, c.total_steps, c.optim.warmup_steps = BATCH, 10, 0
    c.data.train_shards = c.data.tokenizer = "unused"
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def make_batch(seed=0, batch=BATCH):
    """Images and pipeline text: ids, EOS (1), trailing padding; lengths vary (one caption fills the row)."""
    rng = np.random.default_rng(seed)
    text = np.zeros((batch, LENGTH), np.int32)
    for row, n in enumerate(rng.integers(1, LENGTH + 1, batch)):
        text[row, :n] = rng.integers(4, VOCAB, n)
        if n < LENGTH:
            text[row, n - 1] = 1
    text[0, :] = rng.integers(4, VOCAB, LENGTH)  # fills the length: no EOS
    return {"image": rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32), "text": text}


def build(config):
    task = CocaTask(config)
    return task, task.build_model(nnx.Rngs(0))


# -- the loss against numpy ------------------------------------------------------------------------------------

def softmax_reference(zimg, ztxt, log_scale, bias):
    """CLIP loss and d/d(zimg, ztxt)."""
    b, scale = len(zimg), np.exp(log_scale)
    logits = scale * zimg @ ztxt.T
    p_row = np.exp(logits - logits.max(1, keepdims=True))
    p_row /= p_row.sum(1, keepdims=True)
    p_col = np.exp(logits - logits.max(0, keepdims=True))
    p_col /= p_col.sum(0, keepdims=True)
    loss = -0.5 * (np.mean(np.log(np.diag(p_row))) + np.mean(np.log(np.diag(p_col))))
    dlogits = ((p_row - np.eye(b)) + (p_col - np.eye(b))) / (2 * b)
    return loss, scale * dlogits @ ztxt, scale * dlogits.T @ zimg


def sigmoid_reference(zimg, ztxt, log_scale, bias):
    """SigLIP loss and d/d(zimg, ztxt)."""
    b, scale = len(zimg), np.exp(log_scale)
    logits = scale * zimg @ ztxt.T + bias
    labels = 2 * np.eye(b) - 1
    loss = np.sum(np.log1p(np.exp(-labels * logits))) / b
    dlogits = -labels / (1 + np.exp(labels * logits)) / b
    return loss, scale * dlogits @ ztxt, scale * dlogits.T @ zimg


def caption_reference(logits, text, reduction, smoothing):
    """Token cross-entropy on text (targets) where text != 0, and d/d logits."""
    b, length, vocab = logits.shape
    mask = (text != 0).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target = (1 - smoothing) * np.eye(vocab)[text] + smoothing / vocab
    nll = -np.sum(target * logp, -1)
    if reduction == "example":
        per_token_weight = mask / np.maximum(mask.sum(1, keepdims=True), 1) / b
    else:
        per_token_weight = mask / max(mask.sum(), 1)
    loss = np.sum(nll * per_token_weight)
    dlogits = (np.exp(logp) - target) * per_token_weight[..., None]
    return loss, dlogits


class Outputs:
    """Stands in for the model: the task's loss sees only these outputs."""

    def __init__(self, zimg, ztxt, logits, log_scale, bias):
        self.outputs, self.temp = (zimg, ztxt, logits), (log_scale, bias)

    def __call__(self, image, text, rngs=None):
        return self.outputs

    def temperature(self):
        return self.temp


@pytest.mark.slow
@pytest.mark.parametrize("loss, reduction, smoothing", [("sigmoid", "example", 0.0), ("softmax", "token", 0.1)])
def test_loss_and_gradients_equal_numpy(loss, reduction, smoothing):
    config = tiny_config()
    config.model.loss, config.model.loss_impl = loss, "global"
    config.model.caption.loss_reduction, config.model.caption.label_smoothing = reduction, smoothing
    task, model = build(config)
    batch = make_batch()
    zimg, ztxt, logits = model(batch["image"], batch["text"])
    log_scale, bias = model.temperature()

    def total(z1, z2, lg):
        return task.loss(Outputs(z1, z2, lg, log_scale, bias), batch)[0]

    value, grads = jax.value_and_grad(total, argnums=(0, 1, 2))(zimg, ztxt, logits)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    contrastive = {"softmax": softmax_reference, "sigmoid": sigmoid_reference}[loss]
    con, dzimg, dztxt = contrastive(f64(zimg), f64(ztxt), float(log_scale), None if bias is None else float(bias))
    cap, dlogits = caption_reference(f64(logits), batch["text"], reduction, smoothing)
    w_con, w_cap = 0.7, 1.3
    np.testing.assert_allclose(float(value), w_con * con + w_cap * cap, rtol=1e-5)
    for actual, expected in zip(grads, (w_con * dzimg, w_con * dztxt, w_cap * dlogits)):
        np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grads[2])[batch["text"] == 0] == 0)  # pad tokens carry no loss

    _, metrics = task.loss(model, batch)  # the model itself: both parts reported
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), con, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["caption_loss"]), cap, rtol=1e-5)


def test_parallel_prediction_is_refused():
    config = tiny_config()
    config.model.caption.masked_pred_prob = 0.5
    with pytest.raises(ValueError, match="masked_pred_prob.*coca"):
        CocaTask(config)


# -- masks -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_text_inputs_are_teacher_forcing_and_the_cls_sees_no_padding():
    task, model = build(tiny_config())
    batch = make_batch()
    inputs, lengths = model.text_inputs(jnp.asarray(batch["text"]))
    np.testing.assert_array_equal(inputs, teacher_forcing(jnp.asarray(batch["text"]))[0])
    np.testing.assert_array_equal(lengths, np.sum(batch["text"] != 0, axis=1))

    noise = np.random.default_rng(1).integers(0, VOCAB, inputs.shape)
    padding = np.arange(LENGTH)[None] >= np.asarray(lengths)[:, None]
    assert padding.any()
    other_inputs = jnp.where(padding, noise, inputs)  # other tokens where the padding was
    zimg, ztxt, logits = model.forward(batch["image"], inputs, lengths)
    _, other_ztxt, other_logits = model.forward(batch["image"], other_inputs, lengths)
    np.testing.assert_array_equal(other_ztxt, ztxt)
    np.testing.assert_array_equal(np.asarray(other_logits)[~padding], np.asarray(logits)[~padding])

    # the embedding does not depend on how much padding follows; the training logits equal `decode_logits`
    fits = np.sum(batch["text"] != 0, axis=1) <= 6
    assert 0 < fits.sum() < BATCH
    np.testing.assert_allclose(model.embed_text(batch["text"][fits][:, :6]), model.embed_text(batch["text"][fits]),
                               atol=1e-6)
    recomputed = model.decode_logits(model.encode_image(batch["image"]), inputs)
    np.testing.assert_allclose(np.asarray(recomputed)[~padding], np.asarray(logits)[~padding], atol=1e-5)

    # and it does see every real token (so the checks above can fail)
    changed = inputs.at[:, 0].set(5)
    assert np.all(np.abs(model.text_outputs(changed, lengths)[1] - ztxt).max(axis=1) > 1e-4)


def test_decoding_is_causal_and_cross_attends_to_every_caption_query():
    _, model = build(tiny_config())
    batch = make_batch()
    context = model.encode_image(batch["image"])
    assert context.shape == (BATCH, QUERIES, 32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, VOCAB, (BATCH, LENGTH)))
    logits = np.asarray(model.decode_logits(context, tokens))
    for t in (1, 4, LENGTH - 1):
        changed = np.asarray(model.decode_logits(context, tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)))
        np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
        assert np.all(np.abs(changed[:, t:] - logits[:, t:]).max(-1) > 1e-5)
    for q in range(QUERIES):  # every query token reaches every position, the first included
        changed = np.asarray(model.decode_logits(context.at[:, q].add(1.0), tokens))
        assert np.all(np.abs(changed - logits).max(-1) > 1e-5), q


# -- decoding with the cache -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_recomputation(scan):
    config = tiny_config()
    config.model.scan = scan
    task, model = build(config)
    images = make_batch()["image"][:4]
    context = model.encode_image(images)
    tokens = jnp.asarray(np.random.default_rng(3).integers(4, VOCAB, (4, 7)))
    full = model.decode_logits(context, tokens)
    cache = model.init_cache(context, LENGTH)
    assert cache["position"].shape == () and cache["position"].dtype == jnp.int32
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(cache) if leaf.ndim)
    pieces = []
    for start, stop in ((0, 3), (3, 4), (4, 7)):  # a prefill of 3, then 1, then 3
        logits, cache = model.extend(tokens[:, start:stop], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)

    # CaptionPredictions unchanged: greedy decoding with the cache equals decoding by recomputation
    def prefill(inputs):
        return task.prefill(model, inputs, 6)

    def extend(cache, tokens_B):
        return task.extend(model, cache, tokens_B)

    def forward(inputs, tokens_BxT):  # the model made inside the loop: its scanned ViT runs nnx.scan
        return task.forward(nnx.merge(graphdef, params), inputs, tokens_BxT)

    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    cached = generate(prefill, extend, images, max_new_tokens=5, eos_id=1)
    reference = generate(*decoder_from_forward(forward, bos_id=3, max_new_tokens=5), images, max_new_tokens=5,
                         eos_id=1)
    np.testing.assert_array_equal(cached, reference)


@pytest.mark.slow
def test_bfloat16_scanned_rematerialised_model_trains():
    config = tiny_config()
    config.model.dtype, config.model.scan = "bfloat16", True
    for tower in (config.model.image, config.model.text, config.model.decoder):
        tower.remat = "full"
    task, model = build(config)
    graphdef, params = nnx.split(model)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: task.loss(nnx.merge(graphdef, p), b)[0]))(
        nnx.to_pure_dict(params), make_batch())
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# -- micro-batching --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("k, loss, reduction", [(2, "sigmoid", "example"), (4, "softmax", "token")])
def test_microbatches_give_the_full_batch_loss_and_gradients(k, loss, reduction):
    config = tiny_config()
    config.model.loss, config.model.loss_impl, config.model.caption.loss_reduction = loss, "global", reduction
    task, model = build(config)
    graphdef, params = nnx.split(model)
    params, batch = nnx.to_pure_dict(params), make_batch()
    merge = lambda p, *_: nnx.merge(graphdef, p)  # noqa: E731
    (whole, metrics), whole_grads = jax.value_and_grad(lambda p: task.loss(merge(p), batch), has_aux=True)(params)
    (micro, micro_metrics), micro_grads = jax.jit(
        lambda p, b: cached_embedding_grads(task, merge, p, b, k, ways=1))(params, batch)
    np.testing.assert_allclose(float(micro), float(whole), rtol=1e-5)
    for key in ("contrastive_loss", "caption_loss", "logit_scale"):
        np.testing.assert_allclose(float(micro_metrics[key]), float(metrics[key]), rtol=1e-5, err_msg=key)
    flat_whole, flat_micro = dict(leaves_with_path_str(whole_grads)), dict(leaves_with_path_str(micro_grads))
    assert flat_whole.keys() == flat_micro.keys()
    scale = max(float(np.abs(g).max()) for g in flat_whole.values())
    for path, g in flat_whole.items():  # atol: leaves whose gradient is 0 in exact arithmetic (key biases)
        np.testing.assert_allclose(flat_micro[path], g, rtol=1e-5, atol=1e-6 * scale, err_msg=path)
    assert float(np.abs(flat_whole["text_decoder/head/kernel"]).max()) > 0  # the caption term has gradients


@pytest.mark.slow
def test_microbatched_steps_on_eight_devices_match_the_whole_batch():
    """The train step with 2 micro-batches on a data x fsdp x tensor mesh (the collective loss) gives the same
    losses and gradient norms over 3 steps as the whole batch."""
    config = tiny_config(data=2, fsdp=2, tensor=2)
    config.batch_size = 16
    mesh = make_mesh(config.mesh, jax.devices())
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = CocaTask(config, mesh)
    layout = make_state_layout(task, config, mesh)

    def history(step_fn, steps=3):
        state, found = init_train_state(layout, 0), {"loss": [], "grad_norm": []}
        for i in range(steps):
            state, metrics = step_fn(state, to_global_batch(make_batch(i, batch=16), sharding))
            for key in found:
                found[key].append(float(metrics[key]))
        return found

    whole = history(make_train_step(task, layout, sharding))
    assert_same_history(history(make_train_step(task, layout, sharding, microbatches=2)), whole)


# -- LiT, parameter names, FLOPs -------------------------------------------------------------------------------

@pytest.mark.slow
def test_lit_freezes_the_vit_and_its_poolers():
    config = tiny_config()
    config.optim.freeze = "^image_"
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    sharding = batch_sharding(mesh, config.sharding_rules)
    task = CocaTask(config, mesh)
    layout = make_state_layout(task, config, mesh)
    state = init_train_state(layout, 0)
    before = dict(leaves_with_path_str(jax.device_get(state["params"])))
    state, _ = make_train_step(task, layout, sharding)(state, jax.device_put(make_batch(), sharding))
    after = dict(leaves_with_path_str(jax.device_get(state["params"])))
    frozen = [p for p in before if p.startswith("image_")]
    assert {p.split("/")[0] for p in frozen} == {"image_encoder", "image_contrastive_pool", "image_caption_pool",
                                                 "image_proj"}
    assert all(np.array_equal(before[p], after[p]) for p in frozen)
    trained = [p for p in before if p not in frozen]
    assert all(not np.array_equal(before[p], after[p]) for p in trained if p.endswith(("kernel", "embedding")))
    full = coca_train_flops_per_sample(tiny_config().model)
    assert task.train_flops_per_sample() < full


def test_every_parameter_has_logical_axis_names():
    for scan in (False, True):
        config = tiny_config()
        config.model.scan = scan
        task = CocaTask(config)
        abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
        specs = dict(leaves_with_path_str(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))))
        shapes = dict(leaves_with_path_str(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))
        for path, shape in shapes.items():
            spec = specs.get(path)
            if shape.ndim:
                assert spec is not None and len(tuple(spec)) == shape.ndim and any(tuple(spec)), path
        assert tuple(specs["text_encoder/token_embed/embedding"]) == ("vocab", "embed")
        assert tuple(specs["text_decoder/head/kernel"]) == ("embed", "vocab")
        if scan:
            assert tuple(specs["text_encoder/encoder/blocks/attn/query/kernel"])[0] == "layers"
            assert tuple(specs["text_decoder/decoder/blocks/cross_attn/key/kernel"])[0] == "layers"


def test_flops_match_the_compiled_forward():
    """The analytic count against XLA's for the forward pass of a model whose matmuls dominate."""
    config = tiny_config()
    config.model.image.width = config.model.text.width = config.model.decoder.width = 256
    config.model.image.mlp_dim = config.model.text.mlp_dim = config.model.decoder.mlp_dim = 1024
    task = CocaTask(config)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in make_batch(batch=1).items()}
    compiled = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["image"], b["text"])).lower(params, batch).compile()
    ratio = compiled.cost_analysis()["flops"] / (coca_train_flops_per_sample(config.model) / 3)
    print(f"XLA / analytic forward FLOPs: {ratio:.3f}")
    assert 0.9 < ratio < 1.15


# -- meshes and checkpoints --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eight_devices_match_one_device_and_a_restore_steps_identically(tmp_path):
    """data x fsdp x tensor (the ring / all-gather contrastive part) against one device over 5 steps, and the
    steps after a save -> restore equal those of the original state."""
    from test_train_step import run_steps, trained_saved_restored
    config = tiny_config()
    config.batch_size = 16
    one = run_steps(config, jax.devices()[:1])
    for mesh in (dict(data=8), dict(data=2, fsdp=2, tensor=2)):
        eight = tiny_config(**mesh)
        eight.batch_size = 16
        assert_same_history(run_steps(eight, jax.devices()), one)
    config = tiny_config(data=4, fsdp=2)
    config.batch_size = 16
    step_fn, sharding, state, restored = trained_saved_restored(config, tmp_path)
    for i in range(2, 4):
        batch = to_global_batch(make_batch(i, batch=16), sharding)
        state, expected = step_fn(state, batch)
        restored, resumed = step_fn(restored, batch)
        assert float(resumed["loss"]) == float(expected["loss"])
        assert float(resumed["grad_norm"]) == float(expected["grad_norm"])

