"""`MLPClassifier` and `MLPRegressor`: fastnn on scikit-learn's estimator contract.

Each hyper-parameter is a `fastnn.Config` option of the same name (``n_inputs`` and
``n_outputs`` come from the data; ``threads`` is the `Trainer`'s), except ``max_iter``, the
estimators' name of ``epochs``, and ``verbose``. The defaults are chosen for data that is not
MNIST, as scikit-learn users expect (`DEFAULTS` lists where they differ from `Config`'s, the
article's): Adam at 1e-3, biases drawn like the weights, batches of min(200, rows / 5)
(about 1000 updates in 200 epochs), up to 200 epochs, stopping once the training loss has not
dropped by more than ``tol`` for ``n_iter_no_change`` epochs, inputs
standardised per column inside the estimator (a no-op on a ``StandardScaler``'s output,
constant columns scale 1), the backend ``auto`` (numba when it loads, else numpy).
`MLPRegressor` standardises its target too and predicts in the target's units. They work in
``GridSearchCV``, ``Pipeline``, ``clone`` and ``check_estimator``. scikit-learn is imported only
inside the methods that validate data or give tags: importing fastnn never imports it.

``fit`` trains a fresh network with a `Trainer`. ``partial_fit`` trains one more epoch,
continuing the run's epoch numbering (shuffle order and dropout masks are keyed by epoch) and
its optimiser state, on inputs (and targets) scaled with the statistics of the first call;
early stopping and convergence do not apply to it. ``early_stopping`` True holds out
``validation_fraction`` of the rows and stops after ``n_iter_no_change`` epochs without a lower
validation loss, keeping the best epoch (an integer sets that patience itself).

Predictions never depend on the other rows of a call: a batch-norm network normalises with
population statistics (`fastnn.Network.fit_population`).

The fitted state is plain arrays and dicts (parameters, running and population statistics,
optimiser state, the `Config` as a dict, the scalers, the `History`), so a fitted estimator
pickles; the network is rebuilt from it when needed.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .config import Config, default_of
from .errors import MissingDependency
from .network import Network
from .preprocessing import Normalizer
from .train import STOP_EVENTS, Trainer, TrainState

__all__ = ["MLPClassifier", "MLPRegressor"]

#: `Config` options whose default is a dict: the estimators' default is None (meaning {})
_DICT_OPTIONS = ("activation_params", "init_params", "bias_init_params")
#: the estimators' defaults where they differ from `Config`'s (the article's)
DEFAULTS: dict[str, Any] = {
    "hidden": (100,),
    "init": "glorot_uniform",
    "bias_init": "glorot_uniform_b",
    "weight_decay": "auto",
    "normalize": "standard",
    "optimizer": "adam",
    "eta": 1e-3,
    "batch_size": "auto",
    "max_iter": 200,
    "tol": 1e-4,
    "n_iter_no_change": 10,
    "train_figures": "running",
    "early_stopping": False,
    "backend": "auto",
    "dtype": "float32",
}
#: rows per batch with batch_size "auto": min(AUTO_BATCH, ceil(rows / AUTO_STEPS)). scikit-learn's
#: min(200, rows) gives a set of 1000 rows or more 1000 updates in its 200 epochs but a set of
#: one batch 200, too few for Adam at 1e-3 (scikit-learn warns that it has not converged);
#: batches of a fifth of a smaller set give it about the same 1000 updates in the same epochs
AUTO_BATCH = 200
AUTO_STEPS = 5
#: weight_decay "auto": none for a classifier; L2 on the weights for a regressor, whose small
#: noisy data sets otherwise overfit the standardised target (load_diabetes: R^2 0.31 -> 0.40)
AUTO_DECAY: dict[str, tuple[str, float] | None] = {
    "classifier": None,
    "regressor": ("l2", 0.05),
}


class _MLPBase:
    """Shared parameters, fitting, continuation, tags and pickling of the two estimators."""

    _output: ClassVar[str]
    _estimator_type: ClassVar[str]  # the estimator kind, as scikit-learn < 1.6 reads it

    def __init__(
        self,
        hidden: int | Sequence[int] = (100,),
        activation: str = "relu",
        activation_params: dict[str, float] | None = None,
        init: str = "glorot_uniform",
        init_params: dict[str, float] | None = None,
        bias_init: str = "glorot_uniform_b",
        bias_init_params: dict[str, float] | None = None,
        normalize: str = "standard",
        normalize_axis: int | None = None,
        eta: float = 1e-3,
        optimizer: str = "adam",
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        lr_schedule: str = "constant",
        warmup: int = 0,
        lr_step_size: int = 10,
        lr_gamma: float = 0.1,
        lr_min: float = 0.0,
        lr_patience: int = 5,
        plateau_loss: str = "train",
        batch_size: int | str = "auto",
        max_iter: int = 200,
        shuffle: bool = True,
        weight_decay: tuple[str, float] | str | None = "auto",
        dropout_input: float = 1.0,
        dropout_hidden: float = 1.0,
        dropout_mode: str = "article",
        batch_norm: str = "off",
        batch_norm_eta: float | None = None,
        bn_eval: str = "batch",
        bn_momentum: float = 0.9,
        dtype: str = "float32",
        backend: str = "auto",
        seed: int = 0,
        early_stopping: bool | int = False,
        validation_fraction: float = 0.1,
        tol: float = 1e-4,
        n_iter_no_change: int | None = 10,
        train_figures: str = "running",
        stop_on_divergence: bool = False,
        threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        for name, value in locals().items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)

    # ---- parameters (scikit-learn's get_params / set_params) ----
    @classmethod
    def _param_names(cls) -> list[str]:
        """The hyper-parameters: the arguments of ``__init__``."""
        parameters = inspect.signature(cls.__init__).parameters
        return [name for name in parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyper-parameters by name (``deep`` is accepted for scikit-learn; nothing nests)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> _MLPBase:
        """Set hyper-parameters by name (checked when fitting); returns self."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {sorted(valid)!r}."
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        changed = []
        for name in self._param_names():
            value, default = getattr(self, name), defaults[name].default
            try:
                same = value is default or (type(value) is type(default) and bool(value == default))
            except (TypeError, ValueError):
                same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    # ---- scikit-learn tags ----
    def __sklearn_tags__(self) -> Any:
        """Tags of scikit-learn >= 1.6."""
        from sklearn.utils import ClassifierTags, RegressorTags, Tags, TargetTags

        classifier = self._estimator_type == "classifier"
        return Tags(
            estimator_type=self._estimator_type,
            target_tags=TargetTags(required=True, multi_output=not classifier),
            classifier_tags=ClassifierTags() if classifier else None,
            regressor_tags=None if classifier else RegressorTags(),
        )

    def _more_tags(self) -> dict[str, Any]:
        """Tags of scikit-learn < 1.6 (newer versions read `__sklearn_tags__`)."""
        return {"requires_y": True, "multioutput": self._estimator_type == "regressor"}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_arrays")

    # ---- pickling: plain arrays only, the network is rebuilt when needed ----
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_net", None)  # lives on a backend (which holds locks): rebuilt on use
        return state

    def _network(self) -> Network:
        """The fitted network, rebuilt from the fitted arrays after unpickling."""
        net = self.__dict__.get("_net")
        if net is None:
            net = Network(Config.from_dict(self._config))
            net.load_state_arrays(self._arrays)
            self._net = net
        return net

    # ---- data ----
    def _validate(self, x: Any, y: Any = "no_validation", *, reset: bool, **check: Any) -> Any:
        """``x`` (and ``y``) checked by scikit-learn; images (N, ...) are flattened; sets or
        checks ``n_features_in_``."""
        _require_sklearn()
        if isinstance(x, np.ndarray) and x.ndim > 2:
            x = x.reshape(len(x), -1)
        try:
            from sklearn.utils.validation import validate_data
        except ImportError:  # scikit-learn < 1.6
            out = _validate_data_compat(self, x, y, reset=reset, **check)
        else:
            out = validate_data(self, x, y, reset=reset, **check)
        if isinstance(out, tuple):
            return (_numeric(out[0]), out[1])
        return _numeric(out)

    def _resolved_backend(self) -> str:
        """The backend a fit runs on: ``auto`` is numba when it loads, else numpy."""
        if self.backend != "auto":
            return self.backend
        from .backends import available

        return "numba" if available().get("numba") is None else "numpy"

    def _build_config(self, n_inputs: int, n_outputs: int, n_rows: int, **changes: Any
                      ) -> Config:
        """The `Config` of the current hyper-parameters for data of these sizes."""
        values = {name: getattr(self, name) for name in self._param_names()
                  if name not in ("threads", "verbose", "max_iter")}
        for name in _DICT_OPTIONS:
            if values[name] is None:
                values[name] = {}
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                raise ValueError(f"batch_size must be an integer >= 1 or 'auto'; got "
                                 f"{self.batch_size!r}")
            values["batch_size"] = max(1, min(AUTO_BATCH, -(-n_rows // AUTO_STEPS)))
        values["epochs"] = self.max_iter
        if isinstance(self.weight_decay, str):
            if self.weight_decay != "auto":
                raise ValueError(f"weight_decay must be none, (kind, lambda) or 'auto'; got "
                                 f"{self.weight_decay!r}")
            values["weight_decay"] = AUTO_DECAY[self._estimator_type]
        patience = self.early_stopping
        if isinstance(patience, (bool, np.bool_)):
            patience = self.n_iter_no_change if patience else None
            if self.early_stopping and patience is None:
                raise ValueError("early_stopping=True needs n_iter_no_change (its patience)")
        values["early_stopping"] = patience
        if patience is not None:
            values["n_iter_no_change"] = None  # the validation loss decides instead
        values["backend"] = self._resolved_backend()
        values.update(changes)
        return Config(**values, output=self._output, n_inputs=n_inputs, n_outputs=n_outputs)

    def _trainer(self, config: Config) -> Trainer:
        return Trainer(config, threads=self.threads)

    # ---- training ----
    def _train(self, x: np.ndarray, t: np.ndarray, n_outputs: int, *, more: bool,
               sample_weight: Any = None) -> None:
        """Fit a fresh network (``more`` False: ``epochs`` epochs; True: one epoch) or, when
        ``more`` and fitted, train one more epoch from the fitted state."""
        single_run = dict(early_stopping=None, n_iter_no_change=None,
                          validation_fraction=default_of("validation_fraction"))
        if more and self.__sklearn_is_fitted__():
            if n_outputs != self.n_outputs_:
                raise ValueError(
                    f"{type(self).__name__} was fitted with {self.n_outputs_} outputs; "
                    f"got targets with {n_outputs}"
                )
            epoch = self.n_iter_
            batch = Config.from_dict(self._config).batch_size  # "auto" stays the first call's
            config = self._build_config(
                x.shape[1], n_outputs, batch, normalize="none", normalize_axis=None,
                epochs=epoch + 1, **single_run,
                **({"batch_size": batch} if self.batch_size == "auto" else {}),
            )
            history = self.history_.copy()
            for event in (*STOP_EVENTS, "restored_best_epoch"):  # the run goes on
                history.events.pop(event, None)
            resume = TrainState(epoch, history, self._arrays, plateau=self._plateau)
            trainer = self._trainer(config)
            self._run(trainer, self._normalizer.transform(x), t, resume, sample_weight)
        else:
            changes: dict[str, Any] = dict(epochs=1, **single_run) if more else {}
            trainer = self._trainer(
                self._build_config(x.shape[1], n_outputs, len(x), **changes))
            self._run(trainer, x, t, None, sample_weight)
            self._normalizer: Normalizer = trainer.normalizer
            self.n_outputs_ = n_outputs
        net = trainer.network
        config = trainer.config
        if more and config.normalize == "none" and self._normalizer.method != "none":
            config = config.replace(normalize=self._normalizer.method,
                                    normalize_axis=self._normalizer.axis)
        self._config = config.to_dict()
        self._arrays = net.state_arrays()
        self._plateau = trainer.state.plateau if trainer.state is not None else None
        self._net = net
        self.history_ = trainer.history
        self.n_iter_ = trainer.history.epochs
        self.loss_curve_ = list(trainer.history.train_loss[1:])
        self.best_loss_ = min(self.loss_curve_) if self.loss_curve_ else None
        if trainer.history.val_loss:
            self.validation_loss_curve_ = list(trainer.history.val_loss[1:])

    def _run(
        self, trainer: Trainer, x: np.ndarray, t: np.ndarray, resume: TrainState | None,
        sample_weight: Any = None,
    ) -> None:
        callbacks = [_VerboseEpochs()] if self.verbose else []
        trainer.fit(x, t, resume=resume, callbacks=callbacks, sample_weight=sample_weight)

    def to_onnx(self, path: Any) -> Any:
        """Write the fitted estimator as an ONNX graph (needs ``onnx``): input ``x`` raw rows
        (the fit's dtype), output ``y`` (a classifier's probabilities in the order of
        ``classes_`` and its ``label``; a regressor's predictions, (N, k), in the target's
        units)."""
        from sklearn.utils.validation import check_is_fitted

        from . import onnx_export
        from .model import Model

        check_is_fitted(self)
        classes = getattr(self, "classes_", None)
        model = Model(self._network(), self._normalizer,
                      None if classes is None else list(classes))
        graph = onnx_export.model_graph(model, getattr(self, "_target_scaler", None))
        return onnx_export.save(graph, path)

    # ---- using the fitted network ----
    def _outputs(self, x: Any) -> np.ndarray:
        """Network outputs (float64) for raw inputs, normalised as in training."""
        _require_sklearn()
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        x = self._validate(x, reset=False)
        outputs = self._network().infer(self._normalizer.transform(x))
        return np.asarray(outputs, dtype=np.float64)


class MLPClassifier(_MLPBase):
    """A fastnn multilayer perceptron (softmax + cross entropy) as a scikit-learn classifier.

    ``y`` may hold any labels (integers, strings): ``classes_`` are its sorted unique values.
    Fitted attributes: ``classes_``, ``history_`` (the fastnn `History`), ``loss_curve_`` (the
    training loss after each epoch, evaluated on the training rows), ``best_loss_`` (its
    lowest), ``validation_loss_curve_`` (with early stopping), ``n_iter_`` (epochs trained),
    ``n_features_in_``, ``n_outputs_``.
    """

    _output = "softmax_cross_entropy"
    _estimator_type = "classifier"

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPClassifier:
        """Train a fresh network on raw inputs and labels (each row's loss weighted by
        ``sample_weight``, if given); returns self."""
        x, y = self._validate(X, y, reset=True)
        self.classes_ = _classes(y)
        self._train(x, _encode(self.classes_, y), len(self.classes_), more=False,
                    sample_weight=sample_weight)
        return self

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None,
                    classes: Any = None) -> MLPClassifier:
        """Train one more epoch on (X, y); the first call needs ``classes``, every label."""
        fitted = self.__sklearn_is_fitted__()
        x, y = self._validate(X, y, reset=not fitted)
        if not fitted:
            if classes is None:
                raise ValueError("classes must be given on the first call to partial_fit")
            self.classes_ = _classes(np.asarray(classes))
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(
                f"classes={classes!r} is not the same as on the first fit: {self.classes_!r}"
            )
        self._train(x, _encode(self.classes_, y), len(self.classes_), more=True,
                    sample_weight=sample_weight)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in the order of ``classes_``; each row
        sums to 1 in float64 (a float32 network's softmax is renormalised)."""
        probabilities = self._outputs(X)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of `predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row (a label of ``classes_``)."""
        index = self.predict_proba(X).argmax(axis=1)
        return self.classes_[index]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy of `predict` on (X, y)."""
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(y, self.predict(X), sample_weight=sample_weight))


class MLPRegressor(_MLPBase):
    """A fastnn multilayer perceptron (identity output + mean squared error) as a scikit-learn
    regressor; ``y`` is (N,) or (N, k) and `predict` gives the same shape.

    The target is standardised per output inside the estimator (`Normalizer` "standard"),
    so an unscaled target trains as well as a scaled one; `predict` and `score` are in the
    target's own units. Fitted attributes: ``history_`` (the fastnn `History`; its losses are
    0.5 * the mean squared error of the standardised target summed over the outputs, its
    accuracies mean nothing), ``loss_curve_`` (those losses per epoch), ``best_loss_``,
    ``n_iter_``, ``n_features_in_``, ``n_outputs_``.
    """

    _output = "identity_mse"
    _estimator_type = "regressor"

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """Train a fresh network on raw inputs and targets (each row's loss weighted by
        ``sample_weight``, if given); returns self."""
        x, y = self._validate(X, y, reset=True, multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        t = _targets(y)
        self._target_scaler = Normalizer("standard").fit(t, "y")
        t = self._target_scaler.transform(t)
        self._train(x, t, t.shape[1], more=False, sample_weight=sample_weight)
        return self

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """Train one more epoch on (X, y) (the first call: a fresh network, one epoch, and
        the target's scale)."""
        fitted = self.__sklearn_is_fitted__()
        x, y = self._validate(X, y, reset=not fitted, multi_output=True, y_numeric=True)
        t = _targets(y)
        if not fitted:
            self._y_1d = y.ndim == 1
            self._target_scaler = Normalizer("standard").fit(t, "y")
        elif t.shape[1] != self.n_outputs_:
            raise ValueError(f"MLPRegressor was fitted with {self.n_outputs_} outputs; got "
                             f"targets with {t.shape[1]}")
        self._train(x, self._target_scaler.transform(t), t.shape[1], more=True,
                    sample_weight=sample_weight)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets in the target's units: (N,) when fitted on 1-D ``y``, else
        (N, k)."""
        outputs = self._outputs(X)  # checks that the estimator is fitted
        outputs = self._target_scaler.inverse(outputs)
        return outputs[:, 0] if self._y_1d else outputs

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """R^2 of `predict` on (X, y) (averaged over the outputs)."""
        from sklearn.metrics import r2_score

        return float(r2_score(y, self.predict(X), sample_weight=sample_weight))


class _VerboseEpochs:
    """``verbose``: one line per epoch on stdout, as scikit-learn's estimators print."""

    def on_epoch(self, metrics: Any) -> None:
        if metrics.epoch > 0:
            print(f"Iteration {metrics.epoch}, loss = {metrics.train_loss:.8f}", flush=True)


# ---- helpers ----
def _numeric(x: np.ndarray) -> np.ndarray:
    """Inputs fastnn takes: numeric dtypes as they are (converted once, later), bools as 0/1."""
    return x if np.issubdtype(x.dtype, np.number) else x.astype(np.float64)


def _classes(y: np.ndarray) -> np.ndarray:
    """The sorted labels of classification targets; ValueError for continuous ones or one
    class."""
    from sklearn.utils.multiclass import check_classification_targets

    check_classification_targets(y)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(
            f"a classifier needs at least 2 classes; got 1 class ({classes[0]!r})"
            if len(classes) else "a classifier needs at least 2 classes; got none"
        )
    return classes


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels as indices 0..k-1 into ``classes``; ValueError for labels not among them."""
    from sklearn.utils.multiclass import check_classification_targets

    check_classification_targets(y)
    index = np.searchsorted(classes, y)
    known = (index < len(classes)) & (classes[np.minimum(index, len(classes) - 1)] == y)
    if not np.all(known):
        raise ValueError(
            f"y has labels not in classes_ {classes.tolist()!r}: "
            f"{np.unique(np.asarray(y)[~known]).tolist()!r}"
        )
    return index.astype(np.int64)


def _targets(y: np.ndarray) -> np.ndarray:
    """Regression targets as a float64 (N, k) array."""
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(-1, 1) if y.ndim == 1 else y


def _require_sklearn() -> None:
    """Raise `MissingDependency`, saying what to install, when scikit-learn is missing."""
    if importlib.util.find_spec("sklearn") is None:
        raise MissingDependency(
            "fastnn's MLPClassifier and MLPRegressor need scikit-learn: pip install scikit-learn")


def _validate_data_compat(
    estimator: _MLPBase, x: Any, y: Any, *, reset: bool, **check: Any
) -> Any:
    """What ``sklearn.utils.validation.validate_data`` (scikit-learn >= 1.6) does for these
    estimators, on older versions (feature names are not recorded)."""
    from sklearn.utils import check_array, check_X_y

    name = type(estimator).__name__
    if y is None:
        raise ValueError(
            f"This {name} estimator requires y to be passed, but the target y is None."
        )
    if isinstance(y, str) and y == "no_validation":
        out = x = check_array(x)
    else:
        out = x, y = check_X_y(x, y, **check)
    if reset:
        estimator.n_features_in_ = x.shape[1]
    elif x.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"X has {x.shape[1]} features, but {name} is expecting "
            f"{estimator.n_features_in_} features as input."
        )
    return out
