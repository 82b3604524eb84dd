"""Optimisers and learning-rate schedules: each update rule against an independent
transcription of its published form, whole runs against a loop written out by hand, and the
state a resumed run needs (kill and resume gives the same bits for every optimiser)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fastnn import Config, Network, Trainer
from fastnn.backends import get_backend
from fastnn.checkpoint import load_checkpoint, save_checkpoint
from fastnn.errors import ConfigError
from fastnn.plan import OptimizerSpec, ScheduleSpec
from fastnn.schedules import Plateau, epoch_factors

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


# ---- independent transcriptions (scalar loops, as the papers and PyTorch's docs write them) --

def _transcribed(kind: str, params: np.ndarray, grads: list[np.ndarray], lr: float, *,
                 mu: float = 0.9, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> np.ndarray:
    """Run ``len(grads)`` updates of a flat float64 vector element by element.

    sgd / momentum / nesterov as torch.optim.SGD (dampening 0; the L2 gradient lam*p added
    to g), adam as Kingma & Ba's Algorithm 1 (with the L2 gradient added to g), adamw as
    Loshchilov & Hutter's decoupled decay (p <- p - lr * lam * p beside the Adam step).
    """
    p = [float(v) for v in params]
    state = [[0.0, 0.0] for _ in p]
    for t, g_vec in enumerate(grads, start=1):
        for i, g in enumerate(float(v) for v in g_vec):
            if kind != "adamw":
                g = g + weight_decay * p[i]
            if kind == "sgd":
                p[i] = p[i] - lr * g
            elif kind in ("momentum", "nesterov"):
                buf = g if t == 1 else mu * state[i][0] + g
                state[i][0] = buf
                p[i] = p[i] - lr * (g + mu * buf if kind == "nesterov" else buf)
            else:
                m = b1 * state[i][0] + (1 - b1) * g
                v = b2 * state[i][1] + (1 - b2) * g * g
                state[i] = [m, v]
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                decayed = p[i] * (1 - lr * weight_decay) if kind == "adamw" else p[i]
                p[i] = decayed - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_each_update_rule_is_its_published_form(kind: str, decay: float) -> None:
    ops = get_backend("numpy")
    gen = np.random.default_rng(3)
    start = gen.normal(size=7)
    grads = [gen.normal(size=7) for _ in range(12)]
    spec = OptimizerSpec(kind, momentum=0.8, beta1=0.85, beta2=0.99, eps=1e-6)
    param = start.copy()
    slots = tuple(np.zeros(7) for _ in spec.slots)
    for step, grad in enumerate(grads, start=1):
        ops.optimizer_update(param, grad, slots, 0.03, spec, step,
                             "l2" if decay else None, decay)
    expected = _transcribed(kind, start, grads, 0.03, mu=0.8, b1=0.85, b2=0.99, eps=1e-6,
                            weight_decay=decay)
    np.testing.assert_allclose(param, expected, rtol=1e-12, atol=1e-15)


def test_l1_decay_is_coupled_for_adam_and_decoupled_for_adamw() -> None:
    ops = get_backend("numpy")
    grad = np.array([0.5, -0.25])
    for kind, expect_coupled in (("adam", True), ("adamw", False)):
        spec = OptimizerSpec(kind)
        param = np.array([1.0, -2.0])
        slots = (np.zeros(2), np.zeros(2))
        ops.optimizer_update(param, grad, slots, 0.1, spec, 1, "l1", 0.5)
        g = grad + 0.5 * np.sign([1.0, -2.0]) if expect_coupled else grad
        step = g / (np.sqrt(g * g) + 1e-8)  # first Adam step: m_hat = g, v_hat = g^2
        if not expect_coupled:
            step = step + 0.5 * np.sign([1.0, -2.0])
        np.testing.assert_allclose(param, np.array([1.0, -2.0]) - 0.1 * step, rtol=1e-12)


def _data(n: int = 120, d: int = 6, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(5)
    x = gen.normal(size=(n, d))
    return x, (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_run_equals_the_update_rule_applied_by_hand(kind: str) -> None:
    """Trainer.fit with each optimiser and a scheduled rate is the hand-written loop: the
    batches of each epoch's order, the gradients of `Network.loss_and_grads`, the transcribed
    rule at each step's rate."""
    x, y = _data()
    config = Config(hidden=(5,), n_inputs=6, n_outputs=3, epochs=3, batch_size=32, eta=0.05,
                    optimizer=kind, normalize="none", lr_schedule="cosine", warmup=1)
    trainer = Trainer(config)
    trainer.fit(x, y)
    by_hand = Network(config)
    names = list(by_hand.param_shapes())
    flat = np.concatenate([by_hand.params[name].ravel() for name in names])
    one_hot = np.eye(3)[y]
    grads, rates = [], []
    for epoch in range(1, 4):
        order = trainer.epoch_order(epoch, len(x))
        factors = epoch_factors(ScheduleSpec("cosine", 1, epochs=3), epoch, 4, 0.05)
        for step, start in enumerate(range(0, len(x), 32)):
            index = order[start:start + 32]
            _, g = by_hand.loss_and_grads(x[index], one_hot[index])
            grads.append(np.concatenate([g[name].ravel() for name in names]))
            rates.append(0.05 * factors[step])
            # apply this step by hand before the next gradient
            new = _replay(kind, flat, grads, rates)
            offset = 0
            for name in names:
                size = by_hand.params[name].size
                by_hand.params[name] = new[offset:offset + size].reshape(by_hand.params[name].shape)
                offset += size
    got = np.concatenate([trainer.network.params[name].ravel() for name in names])
    np.testing.assert_allclose(got, _replay(kind, flat, grads, rates), rtol=1e-10, atol=1e-13)


def _replay(kind: str, start: np.ndarray, grads: list[np.ndarray], rates: list[float]
            ) -> np.ndarray:
    """The transcribed rule over every gradient so far, each step at its own rate."""
    p = start.copy()
    velocity = np.zeros_like(p)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, rates, strict=True), start=1):
        if kind == "sgd":
            p = p - lr * g
        elif kind in ("momentum", "nesterov"):
            velocity = g if t == 1 else 0.9 * velocity + g
            p = p - lr * (g + 0.9 * velocity if kind == "nesterov" else velocity)
        else:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return p


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_resuming_from_a_checkpoint_gives_the_same_bits(kind: str, tmp_path: Path) -> None:
    """The optimiser's state and the plateau schedule's are written in checkpoints: a run
    stopped after epoch 2 and resumed equals the run straight through, bit for bit."""
    x, y = _data()
    config = Config(hidden=(5,), n_inputs=6, n_outputs=3, epochs=5, batch_size=16, eta=0.05,
                    optimizer=kind, lr_schedule="plateau", lr_patience=1, lr_gamma=0.5,
                    weight_decay=("l2", 1e-3), batch_norm="bn")
    data = (x[:100], y[:100], x[100:], y[100:])
    whole = Trainer(config)
    whole.fit(*data)
    first = Trainer(config.replace(epochs=2))
    first.fit(*data)
    save_checkpoint(tmp_path, config.replace(epochs=2), first.state)
    _, state = load_checkpoint(tmp_path)
    if kind != "sgd":
        assert state.arrays["optimizer_steps"] == 2 * 7
    rest = Trainer(config)
    rest.fit(*data, resume=state)
    for name, value in whole.network.state_arrays().items():
        np.testing.assert_array_equal(rest.network.state_arrays()[name], value, err_msg=name)
    assert rest.history.train_loss == whole.history.train_loss
    assert rest.state.plateau == whole.state.plateau


def test_a_model_file_keeps_no_optimiser_state(tmp_path: Path) -> None:
    x, y = _data()
    trainer = Trainer(Config(hidden=(5,), n_inputs=6, n_outputs=3, epochs=1, optimizer="adam",
                             eta=1e-2))
    trainer.fit(x, y)
    assert "optimizer_m_W1" in trainer.network.state_arrays()
    trainer.save(tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz") as data:
        assert not [name for name in data.files if name.startswith("optimizer_")]


# ---- schedules ----

def test_schedule_factors() -> None:
    assert epoch_factors(ScheduleSpec(), 3, 5, 0.1) is None
    np.testing.assert_allclose(
        epoch_factors(ScheduleSpec("step", step_size=2, gamma=0.5), 5, 3, 0.1), [0.25] * 3)
    np.testing.assert_allclose(
        epoch_factors(ScheduleSpec("exponential", gamma=0.5), 3, 2, 0.1), [0.25] * 2)
    warm = epoch_factors(ScheduleSpec("constant", warmup_epochs=2), 1, 4, 0.1)
    np.testing.assert_allclose(warm, [1 / 8, 2 / 8, 3 / 8, 4 / 8])
    np.testing.assert_allclose(epoch_factors(ScheduleSpec("constant", 2), 3, 4, 0.1), [1] * 4)
    cosine = ScheduleSpec("cosine", warmup_epochs=1, min_rate=0.01, epochs=3)
    second = epoch_factors(cosine, 2, 2, 0.1)
    # after warm-up, updates 2 and 3 of 4: progress 0/4 and 1/4 of the cosine
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.0, 0.25)]
    np.testing.assert_allclose(second, expected)
    third = epoch_factors(cosine, 3, 2, 0.1)
    assert third[-1] > 0.1 and np.all(np.diff(np.concatenate([second, third])) < 0)


def test_plateau_decays_after_patience_and_never_below_the_floor() -> None:
    spec = ScheduleSpec("plateau", gamma=0.5, patience=2, min_rate=0.02)
    watcher = Plateau()
    for loss in (1.0, 0.9, 0.95, 0.9):  # 0.9 again is no gain
        watcher.observe(spec, loss, 0.0, 0.1)
    assert watcher.factor == 0.5 and watcher.waited == 0
    for _ in range(6):
        watcher.observe(spec, 2.0, 0.0, 0.1)
    assert watcher.factor == pytest.approx(0.2)  # lr_min / eta
    assert Plateau.from_dict(watcher.to_dict()) == watcher
    with pytest.raises(ValueError):
        Plateau.from_dict({"factor": "big"})


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")
def test_the_plateau_schedule_lowers_the_rate_of_a_run() -> None:
    x, y = _data()
    config = Config(hidden=(5,), n_inputs=6, n_outputs=3, epochs=6, eta=5.0,
                    lr_schedule="plateau", lr_patience=1, lr_gamma=0.5)
    trainer = Trainer(config)
    trainer.fit(x, y)
    assert trainer.state.plateau is not None and trainer.state.plateau["factor"] < 1.0


def test_convergence_stops_a_run_with_tol_and_n_iter_no_change() -> None:
    x, y = _data()
    config = Config(hidden=(5,), n_inputs=6, n_outputs=3, epochs=200, eta=0.05,
                    optimizer="adam", tol=1e-3, n_iter_no_change=3)
    history = Trainer(config).fit(x, y)
    stopped = history.events["converged_at"]
    assert stopped < 200 and history.epochs == stopped
    # scikit-learn's rule, transcribed: a loss above best - tol counts an epoch without gain,
    # any other resets the count; the best is the lowest loss so far
    best, count, expected = math.inf, 0, None
    for epoch, loss in enumerate(history.train_loss[1:], start=1):
        count = count + 1 if loss > best - 1e-3 else 0
        best = min(best, loss)
        if count >= 3:
            expected = epoch
            break
    assert stopped == expected


def test_options_of_another_optimiser_or_schedule_are_refused() -> None:
    with pytest.raises(ConfigError, match="beta1 is used only by optimizer adam or adamw"):
        Config(beta1=0.8)
    with pytest.raises(ConfigError, match="lr_patience is used only by lr_schedule plateau"):
        Config(lr_schedule="cosine", lr_patience=3)
    with pytest.raises(ConfigError, match="plateau_loss validation needs a validation split"):
        Config(lr_schedule="plateau", plateau_loss="validation")
    with pytest.raises(ConfigError, match="lr_min must be <= eta"):
        Config(lr_schedule="cosine", lr_min=1.0, eta=0.1)
