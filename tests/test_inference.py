"""Batch-independent inference: a fitted batch-norm network answers each row on its own.

The article's evaluation normalises with the statistics of whatever set it is handed (what the
training history reports); `Trainer.predict`, `Model.predict` and the estimators normalise with
population statistics instead (the training set's, computed once after fitting), so a row gets
the same answer alone, in a batch of five or with the whole test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastnn import Config, Model, Trainer
from fastnn.backends import available

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    available().get("numba") is not None, reason="numba is not installed"))]


@pytest.mark.mnist
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", ["n", "bn", "node"])
@pytest.mark.parametrize("dropout_mode", ["article", "inverted"])
def test_mnist_one_row_at_a_time_equals_the_whole_test_set(
    mnist, backend: str, batch_norm: str, dropout_mode: str, tmp_path: Path
) -> None:
    x_train, t_train, x_test, t_test = mnist
    config = Config(epochs=1, dtype="float32", backend=backend, batch_norm=batch_norm,
                    dropout_mode=dropout_mode, dropout_input=0.9, dropout_hidden=0.8)
    trainer = Trainer(config)
    trainer.fit(x_train[:6000], t_train[:6000])
    whole = trainer.predict(x_test)
    assert (whole == t_test).mean() > 0.8
    one_by_one = np.array([trainer.predict(x_test[i:i + 1])[0] for i in range(len(x_test))])
    np.testing.assert_array_equal(one_by_one, whole)
    fives = np.concatenate([trainer.predict(x_test[i:i + 5]) for i in range(0, 100, 5)])
    np.testing.assert_array_equal(fives, whole[:100])
    trainer.save(tmp_path / "model.npz")
    model = Model.load(tmp_path / "model.npz", backend=backend)
    np.testing.assert_array_equal(model.predict(x_test), whole)
    np.testing.assert_array_equal(model.predict(x_test[:1]), whole[:1])


def _fitted(batch_norm: str, bn_eval: str = "batch") -> tuple[Trainer, np.ndarray]:
    gen = np.random.default_rng(0)
    x = gen.normal(size=(400, 8)) * np.arange(1, 9)
    y = (x[:, 0] + x[:, 3] > 0).astype(int)
    trainer = Trainer(Config(hidden=(12, 6), n_inputs=8, n_outputs=2, epochs=3,
                             batch_norm=batch_norm, bn_eval=bn_eval, normalize="z_score"),
                      keep_splits=True)
    trainer.fit(x, y)
    return trainer, x


@pytest.mark.parametrize("batch_norm", ["n", "bn", "node"])
def test_population_statistics_are_the_training_sets(batch_norm: str) -> None:
    """After fitting, each layer's population statistics are the mean and variance of its
    pre-activations over the whole (normalised) training set, the article's whole-set
    statistics; so the training set predicted at once matches the article's evaluation."""
    trainer, x = _fitted(batch_norm)
    net = trainer.network
    train = trainer.splits[0]
    from fastnn.backends import steps

    _, _, caches = steps.forward(net.ops, net.plan, net.params, {}, train.x,
                                 steps.eval_multipliers(net.plan), batch_stats=True)
    for k, cache in enumerate(caches, start=1):
        np.testing.assert_allclose(net.population[k][0], cache.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(net.population[k][1], cache.var, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(trainer.predict_proba(x), net.predict(train.x), rtol=1e-10)
    rows = np.vstack([trainer.predict_proba(x[i:i + 1]) for i in range(10)])
    np.testing.assert_allclose(rows, trainer.predict_proba(x)[:10], rtol=1e-12)


def test_running_statistics_serve_inference_with_bn_eval_running() -> None:
    trainer, x = _fitted("bn", bn_eval="running")
    assert trainer.network.population == {}
    assert trainer.network.inference_statistics() is trainer.network.running
    rows = np.vstack([trainer.predict_proba(x[i:i + 1]) for i in range(10)])
    np.testing.assert_allclose(rows, trainer.predict_proba(x)[:10], rtol=1e-12)


def test_a_model_file_keeps_the_population_and_an_old_one_warns(tmp_path: Path) -> None:
    trainer, x = _fitted("bn")
    trainer.save(tmp_path / "model.npz")
    model = Model.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(model.predict_proba(x), trainer.predict_proba(x))
    with np.load(tmp_path / "model.npz") as data:
        arrays = {name: data[name] for name in data.files if not name.startswith("population")}
    np.savez(tmp_path / "old.npz", **arrays)
    old = Model.load(tmp_path / "old.npz")
    with pytest.warns(RuntimeWarning, match="depends on the other rows"):
        old.predict(x[:3])
