"""``train_figures``: the training loss and accuracy of each epoch, evaluated after it (the
article's) or running means of its batches as they were trained (scikit-learn's loss_curve_)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from parity import backend_or_skip

from fastnn import Config, Network, Trainer

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _data(n: int = 50, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(n, 4))
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)


def _config(**changes: Any) -> Config:
    base = dict(hidden=(5,), n_inputs=4, n_outputs=3, batch_size=16, epochs=2, seed=2,
                dtype="float64", eta=0.3, normalize="none", train_figures="running")
    base.update(changes)
    return Config(**base)


def test_the_running_figures_are_the_batches_before_their_updates() -> None:
    """Epoch 1's figures, transcribed by hand: each batch's softmax cross-entropy and correct
    rows from a plain NumPy forward pass of the weights before that batch's step, then the
    step; the means over the rows plus the L2 penalty of the weights at the epoch's end."""
    x, labels = _data()
    config = _config(weight_decay=("l2", 0.01), epochs=1)
    trainer = Trainer(config)
    history = trainer.fit(x, labels)
    replay = Network(config)
    t = np.eye(3)[labels]
    order = trainer.epoch_order(1, len(x))
    loss_sum, correct = 0.0, 0
    for step, start in enumerate(range(0, len(x), config.batch_size)):
        rows = order[start:start + config.batch_size]
        p = replay.numpy_params()
        hidden = np.maximum(x[rows] @ p["W1"] + p["b1"], 0.0)
        u = hidden @ p["W2"] + p["b2"]
        y = np.exp(u - u.max(axis=1, keepdims=True))
        y /= y.sum(axis=1, keepdims=True)
        loss_sum += float(-np.log(np.maximum(y[np.arange(len(rows)), labels[rows]], 1e-7)).sum())
        correct += int((y.argmax(axis=1) == labels[rows]).sum())
        replay.train_step(x[rows], t[rows], 1, step)
    p = replay.numpy_params()
    penalty = 0.005 * float((p["W1"] ** 2).sum() + (p["W2"] ** 2).sum())
    assert history.train_loss[1] == pytest.approx(loss_sum / len(x) + penalty, rel=1e-12)
    assert history.train_acc[1] == correct / len(x)
    evaluated = Trainer(config.replace(train_figures="evaluate")).fit(x, labels)
    assert history.train_loss[0] == evaluated.train_loss[0]  # before training: evaluated
    assert history.train_loss[1] != evaluated.train_loss[1]
    for key, value in trainer.network.numpy_params().items():  # the steps replayed
        np.testing.assert_array_equal(value, p[key], err_msg=key)


@pytest.mark.parametrize("output", ["softmax_cross_entropy", "identity_mse"])
def test_the_batch_tally_of_the_reference(output: str) -> None:
    """`Ops.batch_tally`: the sum of the rows' losses (0.5 * squared error for a regression)
    and the rows whose largest output is the target's."""
    ops = Network(_config()).ops
    y = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]])
    t = np.eye(3)[[0, 0, 1]]
    loss, correct = ops.batch_tally(y, t, output)
    if output == "identity_mse":
        expected = 0.5 * ((0.3**2 + 0.2**2 + 0.1**2) + (0.9**2 + 0.3**2 + 0.6**2)
                          + (0.5**2 + 0.5**2))
    else:
        expected = -(np.log(0.7) + np.log(0.1) + np.log(0.5))
    assert loss == pytest.approx(expected, rel=1e-14)
    assert correct == 1  # row 2's tie goes to the first maximum, as np.argmax


@pytest.mark.parametrize("options", [
    {},
    {"batch_norm": "bn", "dropout_hidden": 0.7},
    {"output": "identity_mse", "n_outputs": 2},
    {"optimizer": "adam", "eta": 1e-2, "dropout_mode": "inverted", "dropout_input": 0.8},
], ids=["plain", "bn-dropout", "mse", "adam-inverted"])
def test_numba_tallies_match_the_reference_on_one_and_two_threads(options: dict[str, Any]
                                                                    ) -> None:
    """The compiled epoch's tally against the reference's; one thread and two (each step
    shared) give the same bits, and the compiled path ran."""
    ops = backend_or_skip("numba")
    gen = np.random.default_rng(5)
    config = _config(hidden=(6, 5), **options)
    x = gen.normal(size=(70, 4))
    t = np.ascontiguousarray(np.eye(3)[gen.integers(0, 3, 70)][:, :config.n_outputs])
    order = gen.permutation(70)
    reference = np.zeros((5, 2))
    Network(config.replace(backend="numpy")).train_epoch(x, t, order, 1, tally=reference)
    tallies = []
    for threads in (1, 2):
        space = ops.workspace(threads=threads)
        space.options["split_min_work"] = 0  # share even these small steps
        tally = np.zeros((5, 2))
        Network(config.replace(backend="numba")).train_epoch(x, t, order, 1, space,
                                                              tally=tally)
        assert space.counters[f"train_threads_{threads}"] == 1
        tallies.append(tally)
    np.testing.assert_array_equal(tallies[0], tallies[1])
    np.testing.assert_allclose(tallies[0], reference, rtol=1e-12)
    assert reference[:, 1].sum() > 0


def test_running_figures_on_the_overlapped_epochs_are_those_in_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's overlap mode (evaluation on a second thread) records the same running figures."""
    backend_or_skip("numba")
    x, labels = _data(n=80)
    config = _config(backend="numba", epochs=3)
    in_turn = Trainer(config, threads=2).fit(x, labels, x[:20], labels[:20])
    monkeypatch.setenv("FASTNN_NUMBA_PARALLEL", "overlap")
    overlapped = Trainer(config, threads=2).fit(x, labels, x[:20], labels[:20])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert getattr(overlapped, key) == getattr(in_turn, key), key


def test_a_non_finite_running_loss_is_a_divergence() -> None:
    """With no evaluation of the training set, a run that blows up still says so."""
    x, _ = _data()
    target = (x[:, :1] * 1e3) ** 2
    config = _config(eta=1e3, output="identity_mse", n_outputs=1, activation="identity")
    with pytest.warns(RuntimeWarning, match="diverged at epoch 1"):
        history = Trainer(config).fit(x * 1e3, target)
    assert history.events["diverged_at"] == 1
