"""ONNX export: the exported graph, run by onnxruntime, against `Model.outputs` and `predict`
over a grid of networks (every activation, batch-norm variant and evaluation, dropout mode,
output, normaliser and dtype), the estimators, and the command."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastnn import Config, Model, Trainer  # noqa: E402
from fastnn.cli import main  # noqa: E402
from fastnn.errors import MissingDependency  # noqa: E402

#: normwise relative tolerance of the graph against fastnn, per dtype
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}

#: (activation, batch_norm, bn_eval, dropout_mode, output, normalize, dtype): every value of
#: each option at least once, in varied company
GRID = [
    ("relu", "off", "batch", "article", "softmax_cross_entropy", "min_max", "float32"),
    ("sigmoid", "n", "batch", "inverted", "softmax_cross_entropy", "z_score", "float64"),
    ("tanh", "bn", "batch", "article", "identity_mse", "standard", "float32"),
    ("leaky_relu", "node", "batch", "inverted", "identity_mse", "none", "float64"),
    ("identity", "bn", "running", "article", "softmax_cross_entropy", "standard", "float64"),
    ("softplus", "node", "running", "article", "softmax_cross_entropy", "min_max", "float32"),
    ("softsign", "n", "running", "inverted", "identity_mse", "z_score", "float32"),
    ("step", "off", "batch", "article", "softmax_cross_entropy", "none", "float64"),
    ("relu", "node", "batch", "inverted", "softmax_cross_entropy", "min_max", "float64"),
    ("tanh", "off", "batch", "inverted", "identity_mse", "min_max", "float64"),
]


def _model(activation: str, batch_norm: str, bn_eval: str, dropout_mode: str, output: str,
           normalize: str, dtype: str) -> tuple[Model, np.ndarray]:
    x, labels = make_blobs(160, 6, 3, seed=2)
    x = x * np.linspace(0.5, 30.0, 6) + 4.0  # raw, unscaled columns
    config = Config(hidden=(7, 5), n_inputs=6, n_outputs=3, epochs=3, batch_size=20, eta=0.05,
                    activation=activation, activation_params={"alpha": 0.2}
                    if activation == "leaky_relu" else {}, batch_norm=batch_norm,
                    bn_eval=bn_eval, dropout_input=0.8, dropout_hidden=0.6,
                    dropout_mode=dropout_mode, output=output, normalize=normalize,
                    dtype=dtype, seed=3)
    trainer = Trainer(config, threads=1)
    trainer.fit(x[:120], labels[:120])
    classes = ["cat", "dog", "eel"] if output == "softmax_cross_entropy" else None
    return trainer.model(classes), x[120:]


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _assert_close(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    worst = float(np.abs(np.asarray(got, np.float64) - want).max())
    scale = float(np.abs(want).max()) or 1.0
    assert worst <= TOLERANCE[dtype] * scale, f"{what}: {worst:.3g} over {scale:.3g}"


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")
@pytest.mark.parametrize("case", GRID, ids=["-".join(case[:5]) for case in GRID])
def test_the_graph_computes_what_the_model_does(case: tuple[str, ...], tmp_path: Path) -> None:
    model, x = _model(*case)
    dtype = case[-1]
    path = model.to_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    outputs = _run(path, x.astype(dtype))
    assert outputs[0].dtype == np.dtype(dtype)
    _assert_close(outputs[0], model.outputs(x), dtype, "y")
    if case[4] == "softmax_cross_entropy":
        assert outputs[1].tolist() == [str(v) for v in model.predict(x)]
    # each row alone gives its row of the whole batch (to the runtime's rounding: its
    # products take other kernels for one row), batch norm with fixed statistics
    alone = np.concatenate([_run(path, x[i:i + 1].astype(dtype))[0] for i in range(5)])
    _assert_close(alone, model.outputs(x)[:5], dtype, "rows one at a time")


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")
def test_the_estimators_export_labels_and_target_units(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from fastnn import MLPClassifier, MLPRegressor

    x, labels = make_blobs(200, 5, 3, seed=4)
    x = x * 50.0 + 7.0
    classes = np.array([10, 20, 30])[labels]
    clf = MLPClassifier(hidden=(6,), max_iter=5, backend="numpy").fit(x, classes)
    probabilities, label = _run(clf.to_onnx(tmp_path / "clf.onnx"), x.astype(np.float32))
    _assert_close(probabilities, clf.predict_proba(x), "float32", "probabilities")
    np.testing.assert_array_equal(label, clf.predict(x))
    target = x[:, 0] * 3.0 + 1000.0  # raw units, far from 0
    reg = MLPRegressor(hidden=(6,), max_iter=5, backend="numpy").fit(x, target)
    (values,) = _run(reg.to_onnx(tmp_path / "reg.onnx"), x.astype(np.float32))
    _assert_close(values[:, 0], reg.predict(x), "float32", "predictions")
    reg64 = MLPRegressor(hidden=(6,), max_iter=5, backend="numpy", dtype="float64").fit(x, target)
    (values,) = _run(reg64.to_onnx(tmp_path / "reg64.onnx"), x)
    _assert_close(values[:, 0], reg64.predict(x), "float64", "predictions")


def test_fastnn_export_writes_a_graph_and_refuses_bad_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, x = _model(*GRID[0])
    saved = tmp_path / "model.npz"
    model.save(saved)
    out = tmp_path / "model.onnx"
    assert main(["export", str(saved), str(out)]) == 0
    _assert_close(_run(out, x.astype(np.float32))[0], model.outputs(x), "float32", "y")
    fake = tmp_path / "fake.npz"
    fake.write_bytes(b"nothing")
    capsys.readouterr()
    assert main(["export", str(fake), str(tmp_path / "x.onnx")]) == 2
    assert "fake.npz: not a fastnn network file" in capsys.readouterr().err
    assert main(["export", str(saved), str(saved)]) == 2
    assert "the same file as" in capsys.readouterr().err


def test_without_onnx_the_export_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_onnx(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    model, _ = _model(*GRID[0])
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(MissingDependency, match="ONNX export needs onnx: pip install onnx"):
        model.to_onnx(tmp_path / "m.onnx")
    assert main(["export", "whatever.npz", str(tmp_path / "m.onnx")]) == 2


def test_importing_fastnn_never_imports_onnx() -> None:
    import subprocess
    import sys

    code = "import sys, fastnn; print('onnx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"
