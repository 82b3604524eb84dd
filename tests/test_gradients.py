"""Analytic gradients against finite differences (float64) for every option."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import assert_grads_close, numerical_grads, small_batch, small_config

from fastnn import Network
from fastnn.config import ACTIVATIONS, OUTPUTS


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "step"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_activation_and_output_gradients(activation: str, output: str) -> None:
    net = Network(
        small_config(
            activation=activation,
            output=output,
            activation_params={"alpha": 0.2} if activation == "leaky_relu" else {},
        )
    )
    x, t = small_batch()
    _, grads = net.loss_and_grads(x, t)
    assert_grads_close(grads, numerical_grads(net, x, t, None))


def test_step_activation_blocks_gradient_below_it() -> None:
    net = Network(small_config(activation="step"))
    x, t = small_batch()
    _, grads = net.loss_and_grads(x, t)
    numeric = numerical_grads(net, x, t, None)
    assert_grads_close(grads, numeric)
    assert not np.any(grads["W1"]) and not np.any(grads["W2"])
    assert np.any(grads["W3"])


@pytest.mark.parametrize("variant", ["n", "bn", "node"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_batch_norm_gradients(variant: str, activation: str) -> None:
    net = Network(small_config(batch_norm=variant, activation=activation))
    if variant != "n":  # move gamma/beta off 1/0 so their gradients are exercised
        rs = np.random.default_rng(5)
        net.params = {
            k: (v + rs.normal(0, 0.3, v.shape) if k.startswith(("gamma", "beta")) else v)
            for k, v in net.numpy_params().items()
        }
    x, t = small_batch(n=9)
    _, grads = net.loss_and_grads(x, t)
    numeric = numerical_grads(net, x, t, None)
    # BN: one scalar gamma/beta whose article gradient is the node gradients AVERAGED over nodes
    scale = {f"{p}{k}": 1 / net.sizes[k] for p in ("gamma", "beta") for k in (1, 2)}
    assert_grads_close(grads, numeric, scale if variant == "bn" else None)


@pytest.mark.parametrize("variant", ["n", "bn", "node"])
def test_training_gradients_use_batch_statistics_whatever_bn_eval(variant: str) -> None:
    """bn_eval only changes evaluation: with far-off running statistics, loss and gradients
    of a batch are those of bn_eval="batch", and evaluation differs."""
    x, t = small_batch(n=9)
    batch = Network(small_config(batch_norm=variant))
    running = Network(small_config(batch_norm=variant, bn_eval="running"))
    for k in running.running:
        size = running.sizes[k]
        running.running[k] = (np.full(size, 3.0), np.full(size, 0.01))
    loss, grads = running.loss_and_grads(x, t)
    loss_batch, grads_batch = batch.loss_and_grads(x, t)
    assert loss == loss_batch
    for name, grad in grads_batch.items():
        np.testing.assert_array_equal(grads[name], grad, err_msg=name)
    assert not np.allclose(running.predict(x), batch.predict(x))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_weight_decay_gradients_and_penalty(kind: str) -> None:
    lam = 0.03
    net = Network(small_config(weight_decay=(kind, lam)))
    plain = Network(small_config())
    x, t = small_batch()
    loss, grads = net.loss_and_grads(x, t)
    plain_loss, plain_grads = plain.loss_and_grads(x, t)
    assert_grads_close(grads, numerical_grads(net, x, t, None))
    weights = [net.numpy_params()[f"W{k}"] for k in (1, 2, 3)]
    penalty = (
        lam * sum(np.abs(w).sum() for w in weights)
        if kind == "l1"
        else lam / 2 * sum((w**2).sum() for w in weights)
    )
    assert loss == pytest.approx(plain_loss + penalty, rel=1e-12)
    for k, w in zip((1, 2, 3), weights, strict=True):
        decay = lam * np.sign(w) if kind == "l1" else lam * w
        np.testing.assert_allclose(grads[f"W{k}"], plain_grads[f"W{k}"] + decay, rtol=1e-12)
        np.testing.assert_array_equal(grads[f"b{k}"], plain_grads[f"b{k}"])  # biases never decayed


def test_weight_decay_spares_batch_norm_parameters() -> None:
    x, t = small_batch()
    decayed = Network(small_config(batch_norm="node", weight_decay=("l2", 0.5)))
    plain = Network(small_config(batch_norm="node"))
    g1, g2 = decayed.loss_and_grads(x, t)[1], plain.loss_and_grads(x, t)[1]
    for name in ("gamma1", "beta1", "gamma2", "beta2"):
        np.testing.assert_array_equal(g1[name], g2[name])


@pytest.mark.parametrize("mode", ["article", "inverted"])
@pytest.mark.parametrize("batch_norm", ["off", "bn"])
def test_dropout_gradients_with_given_masks(mode: str, batch_norm: str) -> None:
    net = Network(
        small_config(
            dropout_input=0.6, dropout_hidden=0.5, dropout_mode=mode, batch_norm=batch_norm
        )
    )
    x, t = small_batch()
    rs = np.random.default_rng(2)
    if mode == "article":
        masks = {
            0: np.array([1, 0, 1, 1, 0.0]),
            1: np.array([0, 1, 1, 0, 1, 0.0]),
            2: np.array([1, 0, 1, 0.0]),
        }
    else:
        masks = {k: (rs.random((7, d)) < 0.6).astype(float) for k, d in ((0, 5), (1, 6), (2, 4))}
    loss, grads = net.loss_and_grads(x, t, masks)
    scale = (
        {f"{p}{k}": 1 / net.sizes[k] for p in ("gamma", "beta") for k in (1, 2)}
        if batch_norm == "bn"
        else None
    )
    assert_grads_close(grads, numerical_grads(net, x, t, masks), scale)
    if mode == "article":  # dropped input columns get no weight gradient at all
        assert not np.any(grads["W1"][[1, 4]])
        assert not np.any(grads["W2"][[0, 3, 5]])
