"""Contrastive losses against plain float64 references, values and gradients (derived by hand)."""

import math

import jax
import numpy as np
import pytest

from vlm_jax.tasks.contrastive_losses import sigmoid_contrastive_loss, softmax_contrastive_loss


def normalized(rng, b, e):
    x = rng.normal(size=(b, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def softmax_reference(zimg, ztxt, log_scale):
    """Loops over pairs; returns loss and d/d(zimg, ztxt, log_scale)."""
    b = len(zimg)
    scale = math.exp(min(log_scale, math.log(100.0)))
    logits = np.array([[scale * float(zimg[i] @ ztxt[j]) for j in range(b)] for i in range(b)])
    loss, dlogits = 0.0, np.zeros((b, b))
    for i in range(b):  # image -> text: row i, softmax over texts
        row = np.exp(logits[i] - logits[i].max())
        p = row / row.sum()
        loss -= math.log(p[i]) / (2 * b)
        dlogits[i] += (p - np.eye(b)[i]) / (2 * b)
    for j in range(b):  # text -> image: column j, softmax over images
        col = np.exp(logits[:, j] - logits[:, j].max())
        p = col / col.sum()
        loss -= math.log(p[j]) / (2 * b)
        dlogits[:, j] += (p - np.eye(b)[j]) / (2 * b)
    dzimg = scale * dlogits @ ztxt
    dztxt = scale * dlogits.T @ zimg
    dlog_scale = float(np.sum(dlogits * logits)) if log_scale < math.log(100.0) else 0.0
    return loss, (dzimg, dztxt, dlog_scale)


def sigmoid_reference(zimg, ztxt, log_scale, bias):
    b = len(zimg)
    scale = math.exp(log_scale)
    loss = 0.0
    dzimg, dztxt = np.zeros_like(zimg), np.zeros_like(ztxt)
    dlog_scale = dbias = 0.0
    for i in range(b):
        for j in range(b):
            label = 1.0 if i == j else -1.0
            dot = float(zimg[i] @ ztxt[j])
            z = label * (scale * dot + bias)
            loss += math.log1p(math.exp(-z)) / b  # -log sigmoid(z)
            dlogit = -label / (1 + math.exp(z)) / b
            dzimg[i] += dlogit * scale * ztxt[j]
            dztxt[j] += dlogit * scale * zimg[i]
            dlog_scale += dlogit * scale * dot
            dbias += dlogit
    return loss, (dzimg, dztxt, dlog_scale, dbias)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(200.0)])  # below and above the clamp
def test_softmax_loss_matches_reference(batch, log_scale):
    rng = np.random.default_rng(batch)
    zimg, ztxt = normalized(rng, batch, 5), normalized(rng, batch, 5)
    ref_loss, ref_grads = softmax_reference(zimg, ztxt, log_scale)
    args = (np.float32(zimg), np.float32(ztxt), np.float32(log_scale))
    loss, grads = jax.value_and_grad(softmax_contrastive_loss, argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4, 9])
def test_sigmoid_loss_matches_reference(batch):
    rng = np.random.default_rng(batch)
    zimg, ztxt = normalized(rng, batch, 6), normalized(rng, batch, 6)
    log_scale, bias = math.log(10.0), -10.0 + 0.3 * batch
    ref_loss, ref_grads = sigmoid_reference(zimg, ztxt, log_scale, bias)
    args = (np.float32(zimg), np.float32(ztxt), np.float32(log_scale), np.float32(bias))
    loss, grads = jax.value_and_grad(sigmoid_contrastive_loss, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_sigmoid_loss_initial_value_is_dominated_by_negatives():
    """At init (t=10, b=-10) random embeddings give a loss near log(1+e^10)/B for positives."""
    rng = np.random.default_rng(0)
    zimg, ztxt = normalized(rng, 16, 32), normalized(rng, 16, 32)
    loss = sigmoid_contrastive_loss(zimg, ztxt, np.float32(math.log(10.0)), np.float32(-10.0))
    assert 9.0 < float(loss) < 11.0
