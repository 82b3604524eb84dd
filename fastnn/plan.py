"""The training plan: what one SGD step and one evaluation do, layer by layer, as plain data.

A `Plan` is built once per fit from a `Config` and executed by every backend: the reference
backend step by step with its per-op methods (`fastnn.backends.steps`), the numba backend with a
compiled loop around the same kernels its per-op overrides run. It holds no arrays: sizes,
activations, batch-norm variants, dropout keep counts and the recipe of each mask's key,
weight decay, the rate of every parameter, output and loss, batch-norm evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import rng
from .config import Config


@dataclass(frozen=True)
class HiddenSpec:
    """What one hidden layer does after its affine step."""

    activation: str = "relu"
    alpha: float = 0.01
    batch_norm: str = "off"  # off | n | bn | node

    @property
    def params(self) -> dict[str, float]:
        return {"alpha": self.alpha}


@dataclass(frozen=True)
class DropoutSpec:
    """Dropout on the nodes of one layer (0: the input; k: hidden layer k)."""

    layer: int
    size: int
    keep: float  # the keep ratio; 1.0 means no dropout
    keep_count: int  # article mode keeps exactly this many nodes per step

    @property
    def active(self) -> bool:
        return self.keep < 1.0


@dataclass(frozen=True)
class Plan:
    """One fit's step and evaluation, as data every backend executes the same way."""

    sizes: tuple[int, ...]  # d_0 (inputs), d_1 .. d_{L-1} (hidden), d_L (outputs)
    dtype: str
    hidden: tuple[HiddenSpec, ...]  # one per hidden layer
    dropout: tuple[DropoutSpec, ...]  # one per layer 0 .. L-1
    dropout_mode: str  # article: one (d,) 0/1 mask per step; inverted: per element, 1/keep
    seed: int  # mask keys: rng.dropout_key(seed, epoch, step, layer)
    decay: str | None  # None, "l1" or "l2" (on every W, fused into its update)
    lam: float
    eta: float  # rate of W and b
    bn_rate: float  # rate of gamma and beta (0 for the N variant)
    output: str  # softmax_cross_entropy | identity_mse
    batch_norm: str  # off | n | bn | node (every hidden layer)
    bn_eval: str  # batch: evaluate with the evaluated set's statistics; running: averages
    bn_momentum: float
    batch_size: int

    @classmethod
    def from_config(cls, config: Config) -> Plan:
        """The plan of a (validated) config."""
        sizes = config.layer_sizes
        alpha = float(config.activation_params.get("alpha", 0.01))
        hidden = tuple(
            HiddenSpec(config.activation, alpha, config.batch_norm) for _ in config.hidden
        )
        dropout = tuple(
            DropoutSpec(k, sizes[k], keep, rng.keep_count(keep, sizes[k]))
            for k, keep in enumerate(
                [config.dropout_input] + [config.dropout_hidden] * len(config.hidden)
            )
        )
        decay, lam = config.weight_decay if config.weight_decay else (None, 0.0)
        return cls(
            sizes=tuple(sizes),
            dtype=config.dtype,
            hidden=hidden,
            dropout=dropout,
            dropout_mode=config.dropout_mode,
            seed=config.seed,
            decay=decay,
            lam=float(lam),
            eta=config.eta,
            bn_rate=config.bn_rate,
            output=config.output,
            batch_norm=config.batch_norm,
            bn_eval=config.bn_eval,
            bn_momentum=config.bn_momentum,
            batch_size=config.batch_size,
        )

    # ---- layers and parameters ----
    @property
    def n_layers(self) -> int:
        """L: the number of affine layers (hidden layers + the output layer)."""
        return len(self.sizes) - 1

    @property
    def learnable_bn(self) -> bool:
        """True when hidden layers have gamma and beta (the BN and BN(n) variants)."""
        return self.batch_norm in ("bn", "node")

    def bn_shape(self, k: int) -> tuple[int, ...]:
        """Shape of gamma_k/beta_k: one scalar per layer (BN) or one per node (BN(n))."""
        return (self.sizes[k],) if self.batch_norm == "node" else (1,)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape, in the canonical order (W, b, gamma, beta by layer)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for k in range(1, self.n_layers + 1):
            shapes[f"W{k}"] = (self.sizes[k - 1], self.sizes[k])
        for k in range(1, self.n_layers + 1):
            shapes[f"b{k}"] = (self.sizes[k],)
        if self.learnable_bn:
            for prefix in ("gamma", "beta"):
                for k in range(1, self.n_layers):
                    shapes[f"{prefix}{k}"] = self.bn_shape(k)
        return shapes

    def rate(self, name: str) -> float:
        """The SGD rate of a parameter: bn_rate for gamma/beta, eta otherwise."""
        return self.bn_rate if name.startswith(("gamma", "beta")) else self.eta

    # ---- dropout ----
    def mask_key(self, epoch: int, step: int, layer: int) -> int:
        """The 64-bit key of a layer's dropout mask at one training step."""
        return rng.dropout_key(self.seed, epoch, step, layer)

    def epoch_key(self, epoch: int) -> int:
        """The key that `mask_key` folds step and layer into (for compiled loops)."""
        return rng.fold_key(self.seed, rng.STREAM_DROPOUT, epoch)

    def eval_scales(self) -> tuple[float, ...]:
        """Per layer, what evaluation multiplies its nodes by: the keep ratio in article mode
        (training kept that share of them), 1 in inverted mode (training scaled by 1/keep)."""
        if self.dropout_mode == "inverted":
            return tuple(1.0 for _ in self.dropout)
        return tuple(spec.keep for spec in self.dropout)

    # ---- batch norm in evaluation ----
    @property
    def tracks_running(self) -> bool:
        """True when training keeps running statistics that evaluation normalises with."""
        return self.batch_norm != "off" and self.bn_eval == "running"
