"""`Network`: parameters, forward and backward passes through the backend's ops, save/load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import rng
from .backends import HiddenCache, HiddenSpec, get_backend
from .config import Config
from .errors import ConfigError, DataError
from .fileio import write_atomically
from .functions import init_biases, init_weights

Array = Any
FORMAT_VERSION = 1


class Network:
    """A multilayer perceptron for one `Config`, living on ``config.backend``.

    Parameters are ``W1..WL`` (d_{k-1}, d_k), ``b1..bL`` (d_k,), and with learnable batch norm
    ``gamma1..``/``beta1..`` for the hidden layers: shape (1,) for BN, (d_k,) for BN(n).
    """

    def __init__(self, config: Config, params: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.ops = get_backend(config.backend)
        self.dtype = config.dtype
        self.sizes = config.layer_sizes
        self.n_layers = config.n_layers
        self.specs = [
            HiddenSpec(
                activation=config.activation,
                alpha=float(config.activation_params.get("alpha", 0.01)),
                batch_norm=config.batch_norm,
            )
            for _ in config.hidden
        ]
        #: running (mean, var) per hidden layer, used when config.bn_eval == "running"
        self.running: dict[int, tuple[Array, Array]] = {}
        self._params: dict[str, Array] = {}
        self.params = params if params is not None else self.initial_params()
        self._reset_running()

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
            params[f"b{k}"] = init_biases(gen, cfg.bias_init, self.sizes[k], cfg.bias_init_params)
        for k in self._bn_layers():
            shape = self._bn_shape(k)
            params[f"gamma{k}"] = np.ones(shape)
            params[f"beta{k}"] = np.zeros(shape)
        return params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter, by name."""
        shapes: dict[str, tuple[int, ...]] = {}
        for k in range(1, self.n_layers + 1):
            shapes[f"W{k}"] = (self.sizes[k - 1], self.sizes[k])
        for k in range(1, self.n_layers + 1):
            shapes[f"b{k}"] = (self.sizes[k],)
        for k in self._bn_layers():
            shapes[f"gamma{k}"] = shapes[f"beta{k}"] = self._bn_shape(k)
        return shapes

    def _bn_layers(self) -> range:
        learnable = self.config.batch_norm in ("bn", "node")
        return range(1, self.n_layers) if learnable else range(0)

    def _bn_shape(self, k: int) -> tuple[int, ...]:
        return (self.sizes[k],) if self.config.batch_norm == "node" else (1,)

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
        return {
            name: self.config.bn_rate if name.startswith(("gamma", "beta")) else self.config.eta
            for name in self._params
        }

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
        return self.config.dropout_input if layer == 0 else self.config.dropout_hidden

    def dropout_masks(self, epoch: int, step: int, batch: int) -> dict[int, Array]:
        """The 0/1 keep masks of one training step: (d,) in article mode, (batch, d) inverted."""
        masks: dict[int, Array] = {}
        for layer in range(self.n_layers):
            keep = self.keep_ratio(layer)
            if keep >= 1.0:
                continue
            key = rng.dropout_key(self.config.seed, epoch, step, layer)
            d = self.sizes[layer]
            if self.config.dropout_mode == "article":
                masks[layer] = self.ops.article_mask(key, d, keep, self.dtype)
            else:
                masks[layer] = self.ops.bernoulli_mask(key, (batch, d), keep, self.dtype)
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

    def _eval_multipliers(self) -> dict[int, Any]:
        if self.config.dropout_mode == "inverted":
            return {}
        return {k: self.keep_ratio(k) for k in range(self.n_layers) if self.keep_ratio(k) < 1.0}

    # ---- forward and backward ----
    def _forward(
        self, x: Array, multipliers: Mapping[int, Any], batch_stats: bool
    ) -> tuple[Array, list[Array], list[HiddenCache]]:
        """Output pre-activation u_L, the inputs of every layer, and the hidden caches."""
        ops, p = self.ops, self._params
        z = ops.apply_mask(x, multipliers.get(0))
        inputs, caches = [z], []
        for k in range(1, self.n_layers):
            u = ops.affine(z, p[f"W{k}"], p[f"b{k}"])
            stats = None if batch_stats or not self.running else self.running[k]
            z, cache = ops.hidden_forward(
                u,
                self.specs[k - 1],
                p.get(f"gamma{k}"),
                p.get(f"beta{k}"),
                multipliers.get(k),
                stats,
            )
            inputs.append(z)
            caches.append(cache)
        u = ops.affine(z, p[f"W{self.n_layers}"], p[f"b{self.n_layers}"])
        return u, inputs, caches

    def _backward(
        self, du: Array, inputs: list[Array], caches: list[HiddenCache]
    ) -> dict[str, Array]:
        ops, p = self.ops, self._params
        grads: dict[str, Array] = {}
        for k in range(self.n_layers, 0, -1):
            dw, db, dz = ops.affine_backward(inputs[k - 1], p[f"W{k}"], du, need_dx=k > 1)
            grads[f"W{k}"], grads[f"b{k}"] = dw, db
            if k > 1:
                du, dgamma, dbeta = ops.hidden_backward(
                    dz, caches[k - 2], self.specs[k - 2], p.get(f"gamma{k - 1}")
                )
                if dgamma is not None:
                    grads[f"gamma{k - 1}"], grads[f"beta{k - 1}"] = dgamma, dbeta
        return grads

    def penalty(self) -> float:
        """The weight-decay penalty of the current weights (0 without weight decay)."""
        if self.config.weight_decay is None:
            return 0.0
        kind, lam = self.config.weight_decay
        total = 0.0
        for k in range(1, self.n_layers + 1):
            total += self.ops.to_float(self.ops.weight_decay(self._params[f"W{k}"], kind, lam)[0])
        return total

    def _grads(
        self, x: Array, t: Array, multipliers: Mapping[int, Any]
    ) -> tuple[Array, dict, list[HiddenCache]]:
        """(loss as a 0-d array, gradients, hidden caches) for one batch, weight decay included."""
        u, inputs, caches = self._forward(x, multipliers, batch_stats=True)
        _, loss, du = self.ops.output_loss_grad(u, t, self.config.output)
        grads = self._backward(du, inputs, caches)
        if self.config.weight_decay is not None:
            kind, lam = self.config.weight_decay
            for k in range(1, self.n_layers + 1):
                penalty, grad = self.ops.weight_decay(self._params[f"W{k}"], kind, lam)
                grads[f"W{k}"] = grads[f"W{k}"] + grad
                loss = loss + penalty
        return loss, dict(sorted(grads.items(), key=lambda item: _param_order(item[0]))), caches

    def loss_and_grads(
        self, x: Any, t: Any, masks: Mapping[int, Any] | None = None
    ) -> tuple[float, dict[str, Array]]:
        """Loss (with the weight-decay penalty) and gradients of one training batch.

        ``x`` is already normalised; ``t`` one-hot; ``masks`` maps 0 (input) and hidden layer k
        to 0/1 keep masks, applied with the configured dropout mode (None: no dropout).
        Batch norm uses the batch's statistics. Running statistics are not touched.
        """
        x = self.ops.asarray(x, self.dtype)
        t = self.ops.asarray(t, self.dtype)
        loss, grads, _ = self._grads(x, t, self._train_multipliers(masks))
        return self.ops.to_float(loss), grads

    def train_step(self, x: Array, t: Array, epoch: int, step: int) -> None:
        """One SGD step on a batch already on the backend, with the masks of (epoch, step)."""
        masks = self.dropout_masks(epoch, step, x.shape[0])
        _, grads, caches = self._grads(x, t, self._train_multipliers(masks))
        self.ops.sgd_update(self._params, grads, self.rates())
        if self.config.bn_eval == "running" and self.running:
            self._update_running(caches)

    def _update_running(self, caches: list[HiddenCache]) -> None:
        m = self.config.bn_momentum
        for k, cache in enumerate(caches, start=1):
            mean, var = self.running[k]
            self.running[k] = (m * mean + (1 - m) * cache.mean, m * var + (1 - m) * cache.var)

    def forward_eval(self, x: Array) -> Array:
        """Output y in evaluation mode (article: batch norm uses the statistics of x itself)."""
        batch_stats = self.config.bn_eval == "batch"
        u, _, _ = self._forward(x, self._eval_multipliers(), batch_stats=batch_stats)
        return self.ops.output_forward(u, self.config.output)

    def predict(self, x: Any) -> Any:
        """Outputs (host array) for already-normalised inputs, in evaluation mode."""
        return self.ops.to_numpy(self.forward_eval(self.ops.asarray(x, self.dtype)))

    def evaluate(self, x: Array, t: Array, labels: Any) -> tuple[float, float, Any]:
        """(accuracy, loss with penalty, predicted classes) on a whole set in evaluation mode."""
        data_loss, predicted = self.ops.evaluate(self, x, t)
        return float((predicted == labels).mean()), data_loss + self.penalty(), predicted

    # ---- save and load (.npz, no pickle) ----
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Host arrays of the parameters and the running batch-norm statistics."""
        arrays = self.numpy_params()
        for k, (mean, var) in self.running.items():
            arrays[f"running_mean{k}"] = np.array(self.ops.to_numpy(mean))
            arrays[f"running_var{k}"] = np.array(self.ops.to_numpy(var))
        return arrays

    def load_state_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Inverse of `state_arrays`."""
        self.params = {name: arrays[name] for name in self.param_shapes() if name in arrays}
        for k in list(self.running):
            self.running[k] = (
                self.ops.asarray(arrays[f"running_mean{k}"], self.dtype),
                self.ops.asarray(arrays[f"running_var{k}"], self.dtype),
            )

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
        """Write config, parameters and batch-norm state to an .npz file at exactly ``path``
        (through a temporary file and a rename)."""
        meta = {
            "format": "fastnn-network",
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            **(extra or {}),
        }
        arrays = self.state_arrays()
        write_atomically(
            path, lambda handle: np.savez(handle, __meta__=np.array(json.dumps(meta)), **arrays)
        )

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None) -> Network:
        """Read a network written by `save` (optionally onto another backend)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["__meta__"]))
                arrays = {name: data[name] for name in data.files if name != "__meta__"}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"{path}: not a fastnn network file ({exc})") from None
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


def _param_order(name: str) -> tuple[int, int]:
    """Sort key: all W, then b, gamma, beta, each by layer ("beta" tested before "b")."""
    for rank, prefix in ((0, "W"), (3, "beta"), (1, "b"), (2, "gamma")):
        if name.startswith(prefix):
            return rank, int(name[len(prefix) :])
    return 4, 0
