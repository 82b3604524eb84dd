"""`Model`: a trained network with what it needs to take raw inputs, saved as one file.

A `Trainer` normalises inputs with statistics of its training set; a `Model` keeps those
statistics (and, for classifiers, the original class labels) beside the network, so a loaded
model predicts on raw inputs exactly as the trained one did: ``Trainer.save(path)``, then
``Model.load(path).predict(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .network import Network, read_network_file
from .preprocessing import Normalizer, as_inputs

_SHIFT, _SCALE = "normalizer_shift", "normalizer_scale"


class Model:
    """A network, the input normaliser fitted in training, and the class labels (or None)."""

    def __init__(self, network: Network, normalizer: Normalizer | None = None,
                 classes: Sequence[Any] | None = None) -> None:
        self.network = network
        self.normalizer = normalizer if normalizer is not None else Normalizer("none")
        self.classes = None if classes is None else list(classes)
        if self.classes is not None and len(self.classes) != network.sizes[-1]:
            raise DataError(f"{len(self.classes)} class labels for a network with "
                            f"{network.sizes[-1]} outputs")

    # ---- predicting on raw inputs ----
    def outputs(self, x: Any) -> np.ndarray:
        """The network's outputs (softmax probabilities or identity values) for raw inputs,
        each row's independent of the others (`Network.forward_inference`)."""
        net = self.network
        inputs = self.normalizer.transform(as_inputs(x, net.sizes[0], "x"))
        return np.asarray(
            net.ops.to_numpy(net.forward_inference(net.ops.asarray(inputs, net.dtype)))
        )

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities of raw inputs (softmax networks)."""
        if self.network.config.output != "softmax_cross_entropy":
            raise DataError("predict_proba needs a classifier (output softmax_cross_entropy)")
        return self.outputs(x)

    def predict(self, x: Any) -> np.ndarray:
        """Class labels (classifiers: the saved labels, else 0..k-1) or regression values."""
        outputs = self.outputs(x)
        if self.network.config.output != "softmax_cross_entropy":
            return outputs
        index = outputs.argmax(axis=1)
        return index if self.classes is None else np.asarray(self.classes)[index]

    def to_onnx(self, path: str | Path) -> Path:
        """Write the model as an ONNX graph (needs ``onnx``; see `fastnn.onnx_export`): input
        ``x`` raw rows in the network's dtype, outputs ``y`` (probabilities or values) and,
        for a classifier, ``label``."""
        from . import onnx_export

        return onnx_export.save(onnx_export.model_graph(self), path)

    # ---- one file ----
    def save(self, path: str | Path) -> None:
        """Write network, normaliser and class labels to one .npz file (no pickle)."""
        norm = self.normalizer
        extra = {"normalizer": {"method": norm.method, "axis": norm.axis}}
        if self.classes is not None:
            extra["classes"] = [_plain(label) for label in self.classes]
        arrays = {_SHIFT: np.asarray(norm.shift, np.float64),
                  _SCALE: np.asarray(norm.scale, np.float64)}
        self.network.save(path, extra=extra, extra_arrays=arrays)

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None) -> Model:
        """Read a file written by `save` (or a bare `Network.save` file: no normalisation)."""
        meta, arrays = read_network_file(path)
        network = Network.from_file_contents(path, meta, arrays, backend=backend)
        normalizer = None
        settings = meta.get("normalizer")
        if settings is not None:
            if not (isinstance(settings, dict) and _SHIFT in arrays and _SCALE in arrays):
                raise DataError(f"{path}: damaged normaliser in the model file")
            _check_statistics(path, arrays[_SHIFT], arrays[_SCALE])
            normalizer = Normalizer(settings.get("method", "none"), settings.get("axis"),
                                    arrays[_SHIFT], arrays[_SCALE])
        classes = meta.get("classes")
        if classes is not None and not isinstance(classes, list):
            raise DataError(f"{path}: damaged class labels in the model file")
        return cls(network, normalizer, classes)


def _check_statistics(path: str | Path, shift: np.ndarray, scale: np.ndarray) -> None:
    """`DataError` unless the saved normaliser's shift is finite and its scale finite and > 0
    (a zero scale divides every input by 0; a non-finite one makes them 0 or NaN)."""
    for name, values in (("shift", shift), ("scale", scale)):
        if values.dtype.kind not in "fiu":
            raise DataError(f"{path}: damaged normaliser in the model file: its {name} holds "
                            f"{values.dtype}, not real numbers")
        values = values.astype(np.float64)
        bad = ~np.isfinite(values) if name == "shift" else ~(np.isfinite(values) & (values > 0))
        if np.any(bad):
            first = int(np.flatnonzero(bad.ravel())[0])
            where = f"column {first}'s {name}" if values.ndim else f"its {name}"
            need = "finite" if name == "shift" else "finite and > 0"
            raise DataError(f"{path}: damaged normaliser in the model file: {where} is "
                            f"{values.ravel()[first]:g} (must be {need})")


def _plain(label: Any) -> Any:
    """A class label as a JSON value (NumPy scalars become Python ones)."""
    return label.item() if isinstance(label, np.generic) else label
