"""A saved model keeps its input normaliser and class labels: loaded, it predicts on raw inputs
exactly as the trainer that saved it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_blobs

from fastnn import Config, DataError, Model, Network, Trainer


@pytest.mark.parametrize("normalize,axis", [("min_max", None), ("z_score", 0)])
def test_a_loaded_model_predicts_raw_inputs_as_the_trainer(
    tmp_path: Path, normalize: str, axis: int | None
) -> None:
    x, t = make_blobs(400, 20, 3, seed=2)
    config = Config(hidden=(12,), n_inputs=20, n_outputs=3, epochs=2, batch_norm="bn",
                    normalize=normalize, normalize_axis=axis)
    trainer = Trainer(config)
    trainer.fit(x[:300], t[:300], x[300:], t[300:])
    names = np.array(["cat", "dog", "eel"])
    trainer.save(tmp_path / "model.npz", classes=names)
    model = Model.load(tmp_path / "model.npz")
    assert model.classes == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(model.outputs(x[300:]), trainer.predict_proba(x[300:]))
    np.testing.assert_array_equal(model.predict(x[300:]), names[trainer.predict(x[300:])])
    np.testing.assert_array_equal(model.predict_proba(x[:5]), trainer.predict_proba(x[:5]))
    accuracy = (model.predict(x[300:]) == names[t[300:]]).mean()
    assert accuracy == (trainer.predict(x[300:]) == t[300:]).mean()


def test_a_bare_network_file_loads_without_normalisation(tmp_path: Path) -> None:
    net = Network(Config(hidden=(4,), n_inputs=3, n_outputs=2))
    net.save(tmp_path / "net.npz")
    model = Model.load(tmp_path / "net.npz")
    x = np.array([[0.1, 0.5, 0.9]])
    np.testing.assert_array_equal(model.outputs(x), net.predict(x))
    assert model.classes is None and model.predict(x).tolist() == [int(net.predict(x).argmax())]


def test_model_errors(tmp_path: Path) -> None:
    net = Network(Config(hidden=(4,), n_inputs=3, n_outputs=2, output="identity_mse"))
    with pytest.raises(DataError, match="3 class labels"):
        Model(net, classes=["a", "b", "c"])
    with pytest.raises(DataError, match="classifier"):
        Model(net).predict_proba(np.zeros((1, 3)))
    (tmp_path / "junk.npz").write_bytes(b"not a file")
    with pytest.raises(DataError, match="not a fastnn network file"):
        Model.load(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="fitted"):
        Trainer(Config()).save(tmp_path / "x.npz")
