"""`Network`: parameters, forward and backward passes through the backend's ops, save/load."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import rng
from .backends import get_backend, steps
from .backends.optimizers import OptimizerState
from .backends.workspace import Workspace
from .config import Config
from .errors import ConfigError, DataError
from .fileio import ARCHIVE_ERRORS, os_reason, write_atomically
from .functions import init_biases, init_weights
from .memory import check_memory
from .plan import Plan
from .preprocessing import labels_and_one_hot
from .threads import blas_threads

Array = Any
FORMAT_VERSION = 1
#: state-array names of the population statistics: population_mean1, population_var1, ...
POPULATION_PREFIX = "population_"


class SetScores(NamedTuple):
    """What `Network.scores` measures on one set."""

    accuracy: float
    loss: float  # the data loss plus the weight-decay penalty
    classes: Any  # host array of each row's predicted class


class Network:
    """A multilayer perceptron for one `Config`, living on ``config.backend``.

    Parameters are ``W1..WL`` (d_{k-1}, d_k), ``b1..bL`` (d_k,), and with learnable batch norm
    ``gamma1..``/``beta1..`` for the hidden layers: shape (1,) for BN, (d_k,) for BN(n).
    """

    def __init__(self, config: Config, params: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.ops = get_backend(config.backend)
        #: what a training step and an evaluation do: every backend executes this plan
        self.plan = Plan.from_config(config)
        self.dtype = config.dtype
        self.sizes = config.layer_sizes
        self.n_layers = config.n_layers
        self.specs = list(self.plan.hidden)
        count = sum(math.prod(shape) for shape in self.plan.param_shapes().values())
        # the float64 initial draw, then parameters, gradients and the optimiser's slots
        check_memory(count * (8 + np.dtype(self.dtype).itemsize
                              * (2 + len(self.plan.optimizer.slots))),
                     f"the network ({count:,} parameters in {self.dtype})")
        #: running (mean, var) per hidden layer, used when config.bn_eval == "running"
        self.running: dict[int, tuple[Array, Array]] = {}
        self._params: dict[str, Array] = {}
        self.params = params if params is not None else self.initial_params()
        self._reset_running()
        #: the optimiser's per-parameter state and update count (empty for plain sgd)
        self.optimizer = OptimizerState.zeros(
            self.plan.optimizer.slots, self.param_shapes(), self.ops, self.dtype
        )
        #: per hidden layer the (mean, var) that inference normalises with (batch norm with
        #: bn_eval "batch": the training set's statistics, set after fitting; see `predict`)
        self.population: dict[int, tuple[Array, Array]] = {}

    # ---- parameters ----
    def initial_params(self) -> dict[str, np.ndarray]:
        """Host float64 initial parameters drawn from the seed's initialisation stream."""
        cfg = self.config
        gen = np.random.default_rng(rng.fold_key(cfg.seed, rng.STREAM_INIT))
        params: dict[str, np.ndarray] = {}
        for k in range(1, self.n_layers + 1):
            params[f"W{k}"] = init_weights(
                gen, cfg.init, self.sizes[k - 1], self.sizes[k], cfg.init_params
            )
        for k in range(1, self.n_layers + 1):
            params[f"b{k}"] = init_biases(gen, cfg.bias_init, self.sizes[k], cfg.bias_init_params,
                                          fan_in=self.sizes[k - 1])
        for name, shape in self.param_shapes().items():
            if name.startswith("gamma"):
                params[name] = np.ones(shape)
            elif name.startswith("beta"):
                params[name] = np.zeros(shape)
        return params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter, by name."""
        return self.plan.param_shapes()

    @property
    def params(self) -> dict[str, Array]:
        """The live parameter arrays (on the backend), by name."""
        return self._params

    @params.setter
    def params(self, values: Mapping[str, Any]) -> None:
        shapes = self.param_shapes()
        missing = sorted(set(shapes) - set(values))
        unknown = sorted(set(values) - set(shapes))
        if missing or unknown:
            raise ConfigError(
                f"params must have exactly {sorted(shapes)}; missing {missing}, unknown {unknown}"
            )
        checked = ParamDict(self)
        for name in shapes:
            checked[name] = values[name]
        self._params = checked

    def checked_param(self, name: str, value: Any) -> Array:
        """``value`` as a fresh backend array of this network's dtype and the shape of ``name``."""
        shapes = self.param_shapes()
        if name not in shapes:
            raise ConfigError(f"unknown parameter {name!r}; valid: {', '.join(shapes)}")
        shape = shapes[name]
        array = self.ops.asarray(value, self.dtype)
        if array.shape == (1, *shape) or (shape == (1,) and array.shape == ()):
            array = array.reshape(shape)
        if tuple(array.shape) != shape:
            raise ConfigError(f"param {name} must have shape {shape}; got {tuple(array.shape)}")
        return array

    def numpy_params(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter (never views of the live arrays)."""
        return {name: np.array(self.ops.to_numpy(value)) for name, value in self._params.items()}

    def rates(self) -> dict[str, float]:
        """The SGD rate of every parameter (eta; batch_norm_eta for gamma and beta)."""
        return {name: self.plan.rate(name) for name in self._params}

    def _reset_running(self) -> None:
        self.running = {}
        if self.config.batch_norm != "off":
            xp = self.ops.xp
            for k in range(1, self.n_layers):
                d = self.sizes[k]
                self.running[k] = (xp.zeros(d, dtype=self.dtype), xp.ones(d, dtype=self.dtype))

    # ---- dropout masks ----
    def keep_ratio(self, layer: int) -> float:
        """Keep ratio of layer 0 (the input) or hidden layer k."""
        return self.plan.dropout[layer].keep

    def dropout_masks(self, epoch: int, step: int, batch: int) -> dict[int, Array]:
        """The 0/1 keep masks of one training step: (d,) in article mode, (batch, d) inverted."""
        masks: dict[int, Array] = {}
        for spec in self.plan.dropout:
            if not spec.active:
                continue
            key = self.plan.mask_key(epoch, step, spec.layer)
            if self.plan.dropout_mode == "article":
                masks[spec.layer] = self.ops.article_mask(key, spec.size, spec.keep, self.dtype)
            else:
                shape = (batch, spec.size)
                masks[spec.layer] = self.ops.bernoulli_mask(key, shape, spec.keep, self.dtype)
        return masks

    def _train_multipliers(self, masks: Mapping[int, Any] | None) -> dict[int, Array]:
        if not masks:
            return {}
        out: dict[int, Array] = {}
        for layer, mask in masks.items():
            if not 0 <= layer < self.n_layers:
                raise ConfigError(f"mask layer must be in 0..{self.n_layers - 1}; got {layer}")
            array = self.ops.asarray(mask, self.dtype)
            if self.config.dropout_mode == "inverted":
                array = array / self.keep_ratio(layer)
            out[layer] = array
        return out

    # ---- forward and backward (the plan executed by the backend's ops) ----
    def penalty(self) -> float:
        """The weight-decay penalty of the current weights (0 without weight decay)."""
        if self.plan.decay is None:
            return 0.0
        total = 0.0
        for k in range(1, self.n_layers + 1):
            penalty = self.ops.weight_decay(self._params[f"W{k}"], self.plan.decay, self.plan.lam)
            total += self.ops.to_float(penalty[0])
        return total

    def loss_and_grads(
        self, x: Any, t: Any, masks: Mapping[int, Any] | None = None
    ) -> tuple[float, dict[str, Array]]:
        """Loss (with the weight-decay penalty) and gradients of one training batch.

        ``x`` is already normalised; ``t`` one-hot; ``masks`` maps 0 (input) and hidden layer k
        to 0/1 keep masks, applied with the configured dropout mode (None: no dropout).
        Batch norm uses the batch's statistics. Running statistics are not touched.
        """
        x = self._inputs(x, "x")
        t = self._targets(t, len(x), "t")
        multipliers = self._train_multipliers(masks)
        loss, grads = steps.loss_and_grads(self.ops, self.plan, self._params, x, t, multipliers)
        return self.ops.to_float(loss), grads

    def train_step(self, x: Array, t: Array, epoch: int, step: int,
                   rate_factor: float = 1.0) -> None:
        """One training step on a batch already on the backend, with the masks of (epoch,
        step), by the configured optimiser (its state: ``self.optimizer``)."""
        steps.train_step(self.ops, self.plan, self._params, self.running, x, t, epoch, step,
                         self.optimizer, rate_factor)

    def forward_eval(self, x: Array) -> Array:
        """Output y in evaluation mode (article: batch norm uses the statistics of x itself)."""
        return steps.forward_eval(self.ops, self.plan, self._params, self.running, x)

    def inference_statistics(self) -> dict[int, tuple[Array, Array]] | None:
        """What batch norm normalises with at inference: the population statistics
        (`fit_population`), else the running averages (bn_eval "running"); None when the
        network has neither (no batch norm, or never fitted)."""
        if self.plan.batch_norm == "off":
            return None
        if self.population:
            return self.population
        return self.running if self.plan.tracks_running else None

    def fit_population(self, x: Array) -> None:
        """Set the population statistics inference normalises with: each hidden layer's mean
        and variance over all of ``x`` (the normalised training set) in evaluation mode, the
        lower layers normalised with theirs (what the article's evaluation of the training
        set normalises with, summed in float64: `steps.population_statistics`). With bn_eval
        "running" the running averages serve instead. The products run on one BLAS thread:
        a threaded product rounds differently, and the statistics of a run must not depend on
        how many CPUs the process that computed them had."""
        if self.plan.batch_norm == "off" or self.plan.tracks_running:
            return
        with blas_threads(1):
            self.population = steps.population_statistics(self.ops, self.plan, self._params, x)

    def forward_inference(self, x: Array) -> Array:
        """Outputs y with each row's answer independent of the other rows: batch norm uses
        `inference_statistics`. A batch-norm network without them (never fitted, or loaded
        from an older file) falls back to the batch's own statistics, with a warning."""
        stats = self.inference_statistics()
        if stats is None:
            if self.plan.batch_norm != "off":
                warnings.warn(
                    "this batch-norm network has no population statistics (not fitted, or "
                    "saved by an older fastnn): each prediction depends on the other rows of "
                    "its batch", RuntimeWarning, stacklevel=2)
            return self.forward_eval(x)
        return steps.forward_inference(self.ops, self.plan, self._params, stats, x)

    def predict(self, x: Any) -> Any:
        """Outputs (host array) for already-normalised inputs in the article's evaluation mode
        (batch norm: the statistics of x itself); `infer` answers each row on its own."""
        return self.ops.to_numpy(self.forward_eval(self._inputs(x, "x")))

    def infer(self, x: Any) -> Any:
        """Outputs (host array) for already-normalised inputs, each row's independent of the
        others (`forward_inference`)."""
        return self.ops.to_numpy(self.forward_inference(self._inputs(x, "x")))

    def _inputs(self, x: Any, what: str) -> Array:
        """Already-normalised (N, n_inputs) float inputs on the backend, or a `DataError`."""
        host = x if isinstance(x, np.ndarray) else None
        if host is None and not hasattr(x, "__cuda_array_interface__"):
            host = np.asarray(x)
        if host is not None:
            if not np.issubdtype(host.dtype, np.floating):
                raise DataError(
                    f"{what}: the network takes normalised float inputs; got dtype {host.dtype} "
                    "(raw pixels? normalise them as the training set was: Trainer.normalizer)"
                )
            if host.ndim != 2 or host.shape[1] != self.sizes[0]:
                raise DataError(f"{what}: expected shape (N, {self.sizes[0]}); got {host.shape}")
        return self.ops.asarray(x, self.dtype)

    def _targets(self, t: Any, rows: int, what: str) -> Array:
        """One-hot (or regression) targets on the backend from labels or rows, checked."""
        if isinstance(t, np.ndarray) or not hasattr(t, "__cuda_array_interface__"):
            host = np.asarray(t)
            if host.ndim == 1 or not np.issubdtype(host.dtype, np.floating):
                host = labels_and_one_hot(host, self.sizes[-1], what, self.config.output)[1]
            elif host.shape != (rows, self.sizes[-1]):
                raise DataError(f"{what}: expected shape ({rows}, {self.sizes[-1]}); "
                                f"got {host.shape}")
            if len(host) != rows:
                raise DataError(f"{what}: {len(host)} targets for {rows} inputs")
            t = host
        return self.ops.asarray(t, self.dtype)

    def scores(
        self, x: Array, t: Array, labels: Any, workspace: Workspace | None = None
    ) -> SetScores:
        """`SetScores` (accuracy, loss with the weight-decay penalty, predicted classes) of a
        whole set in the article's evaluation mode.

        ``workspace``: the run's (a fit passes its own); None: a fresh one for this call.
        """
        if workspace is None:
            workspace = self.ops.workspace()
            with self.ops.activate(workspace):
                return self.scores(x, t, labels, workspace)
        data_loss, predicted = self.ops.loss_and_classes(
            self.plan, self._params, self.running, x, t, workspace
        )
        return SetScores(float((predicted == labels).mean()), data_loss + self.penalty(),
                         predicted)

    def train_epoch(
        self, x: Array, t: Array, order: Any, epoch: int, workspace: Workspace | None = None,
        rate_factors: Any = None, weights: Array | None = None, tally: Any = None,
    ) -> None:
        """One epoch over the rows of x in ``order`` on the backend (in place), at the plan's
        rates times ``rate_factors`` (one per step; None: 1), each row's loss weighted by
        ``weights`` (None: equally); ``tally`` (host float64 (steps, 2), or None) gets each
        step's sum of row losses and count of correct rows (`Ops.batch_tally`)."""
        if workspace is None:
            workspace = self.ops.workspace()
            with self.ops.activate(workspace):
                self.train_epoch(x, t, order, epoch, workspace, rate_factors, weights, tally)
            return
        self.ops.train_epoch(
            self.plan, self._params, self.running, x, t, order, epoch, workspace,
            self.optimizer, rate_factors, weights, tally,
        )

    def copy(self) -> Network:
        """A network of the same config with copies of the parameters, running and population
        statistics and optimiser state."""
        twin = Network(self.config, params=self._params)  # ParamDict copies every array
        for k, (mean, var) in self.running.items():
            twin.running[k] = (self.ops.asarray(mean, self.dtype),
                               self.ops.asarray(var, self.dtype))
        twin.population = {k: (self.ops.asarray(mean, self.dtype),
                               self.ops.asarray(var, self.dtype))
                           for k, (mean, var) in self.population.items()}
        twin.optimizer = self.optimizer.copy(self.ops, self.dtype)
        return twin

    # ---- save and load (.npz, no pickle) ----
    def state_arrays(self, optimizer: bool = True) -> dict[str, np.ndarray]:
        """Host arrays of the parameters, the running and population batch-norm statistics
        and (``optimizer``) the optimiser's state."""
        arrays = self.numpy_params()
        for k, (mean, var) in self.running.items():
            arrays[f"running_mean{k}"] = np.array(self.ops.to_numpy(mean))
            arrays[f"running_var{k}"] = np.array(self.ops.to_numpy(var))
        for k, (mean, var) in self.population.items():
            arrays[f"{POPULATION_PREFIX}mean{k}"] = np.array(self.ops.to_numpy(mean))
            arrays[f"{POPULATION_PREFIX}var{k}"] = np.array(self.ops.to_numpy(var))
        if optimizer:
            arrays.update(self.optimizer.arrays(self.plan.optimizer.slots, self.ops))
        return arrays

    def load_state_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Inverse of `state_arrays` (optimiser state and population statistics the arrays
        lack start afresh: zeros, none)."""
        self.params = {name: arrays[name] for name in self.param_shapes() if name in arrays}
        for k in list(self.running):
            self.running[k] = (
                self.ops.asarray(arrays[f"running_mean{k}"], self.dtype),
                self.ops.asarray(arrays[f"running_var{k}"], self.dtype),
            )
        self.population = {}
        if self.plan.batch_norm != "off" and f"{POPULATION_PREFIX}mean1" in arrays:
            shapes = {k: (self.sizes[k],) for k in range(1, self.n_layers)}
            for k, shape in shapes.items():
                mean = self.ops.asarray(arrays[f"{POPULATION_PREFIX}mean{k}"], self.dtype)
                var = self.ops.asarray(arrays[f"{POPULATION_PREFIX}var{k}"], self.dtype)
                if tuple(mean.shape) != shape or tuple(var.shape) != shape:
                    raise DataError(f"population statistics of layer {k} must have shape "
                                    f"{shape}; got {tuple(mean.shape)}, {tuple(var.shape)}")
                self.population[k] = (mean, var)
        self.optimizer.load(self.plan.optimizer.slots, arrays, self.ops, self.dtype)

    def save(
        self, path: str | Path, extra: Mapping[str, Any] | None = None,
        extra_arrays: Mapping[str, Any] | None = None,
    ) -> None:
        """Write config, parameters and batch-norm state to an .npz file at exactly ``path``
        (through a temporary file and a rename); ``extra`` goes into the JSON header and
        ``extra_arrays`` beside the parameters (what a `fastnn.model.Model` adds)."""
        meta = {
            "format": "fastnn-network",
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            **(extra or {}),
        }
        arrays = {**{name: np.asarray(value) for name, value in (extra_arrays or {}).items()},
                  **self.state_arrays(optimizer=False)}
        write_atomically(
            path, lambda handle: np.savez(handle, __meta__=np.array(json.dumps(meta)), **arrays)
        )

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None) -> Network:
        """Read a network written by `save` (optionally onto another backend)."""
        return cls.from_file_contents(path, *read_network_file(path), backend=backend)

    @classmethod
    def from_file_contents(
        cls, path: str | Path, meta: Any, arrays: Mapping[str, Any], backend: str | None = None
    ) -> Network:
        """The network of a file's header and arrays (as `read_network_file` gives them)."""
        if (
            not isinstance(meta, dict)
            or meta.get("format") != "fastnn-network"
            or meta.get("version") != FORMAT_VERSION
            or not isinstance(meta.get("config"), dict)
        ):
            raise DataError(f"{path}: not a fastnn network file of version {FORMAT_VERSION}")
        try:
            config = Config.from_dict(meta["config"])
        except (ConfigError, TypeError) as exc:
            raise DataError(f"{path}: invalid config in network file ({exc})") from None
        if backend is not None:
            config = config.replace(backend=backend)
        net = cls(config)
        missing = sorted(set(net.param_shapes()) - set(arrays))
        if missing:
            raise DataError(f"{path}: missing parameters {missing}")
        net.load_state_arrays(arrays)
        return net


def read_network_file(path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
    """(JSON header, arrays) of a file written by `Network.save`; `DataError` if unreadable."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a fastnn network file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({os_reason(exc)})") from None
    if start != b"PK\x03\x04":  # every .npz is a zip archive
        raise DataError(f"{path}: not a fastnn network file (a .npz archive written by "
                        "--save-model or Model.save)")
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            arrays = {name: data[name] for name in data.files if name != "__meta__"}
    except (OSError, *ARCHIVE_ERRORS) as exc:
        raise DataError(f"{path}: not a fastnn network file, or a damaged one "
                        f"({exc.__class__.__name__}: {exc})") from None
    return meta, arrays


class ParamDict(dict):
    """The live parameters: assigning an item checks its shape and copies it to the backend in
    the network's dtype (re-assigning the stored array itself, as ``p[k] -= g`` does, is free)."""

    def __init__(self, network: Network) -> None:
        super().__init__()
        self._network = network

    def __setitem__(self, name: str, value: Any) -> None:
        if dict.get(self, name) is value:
            return
        dict.__setitem__(self, name, self._network.checked_param(name, value))


