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


#: the arrays each parameter keeps between steps, by optimiser
OPTIMIZER_SLOTS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("velocity",),
    "nesterov": ("velocity",),
    "adam": ("m", "v"),
    "adamw": ("m", "v"),
}


@dataclass(frozen=True)
class OptimizerSpec:
    """The update rule every parameter follows (each one's state lives in the fit's
    `OptimizerState`, beside the parameters).

    ``sgd``: p -= rate * g. ``momentum``: v = momentum * v + g; p -= rate * v. ``nesterov``:
    v = momentum * v + g; p -= rate * (g + momentum * v). ``adam``: m = beta1 m + (1 - beta1) g,
    v = beta2 v + (1 - beta2) g^2, p -= rate * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t))
    + eps) at update t = 1, 2, .... ``adamw``: adam, with the weight-decay gradient applied to
    p beside the step (p -= rate * decay gradient) instead of being added to g.
    """

    kind: str = "sgd"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def slots(self) -> tuple[str, ...]:
        """The names of the arrays each parameter keeps (none for sgd)."""
        return OPTIMIZER_SLOTS[self.kind]

    @property
    def decoupled(self) -> bool:
        """True when weight decay is applied to p directly, not added to the gradient."""
        return self.kind == "adamw"

    @property
    def adaptive(self) -> bool:
        """True for the Adam family (bias-corrected first and second moments)."""
        return self.kind in ("adam", "adamw")


@dataclass(frozen=True)
class ScheduleSpec:
    """How the learning rate moves over a run (`fastnn.schedules` computes each step's rate)."""

    kind: str = "constant"  # constant | step | exponential | cosine | plateau
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    min_rate: float = 0.0
    patience: int = 5
    plateau_loss: str = "train"
    epochs: int = 50  # the run's length (cosine reaches min_rate at its end)


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
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()

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
            optimizer=OptimizerSpec(
                config.optimizer, config.momentum, config.beta1, config.beta2, config.eps
            ),
            schedule=ScheduleSpec(
                config.lr_schedule, config.warmup, config.lr_step_size, config.lr_gamma,
                config.lr_min, config.lr_patience, config.plateau_loss, config.epochs,
            ),
        )

    # ---- layers and parameters ----
    @property
    def n_layers(self) -> int:
        """L: the number of affine layers (hidden layers + the output layer)."""
        return len(self.sizes) - 1

    @property
    def itemsize(self) -> int:
        """Bytes of one number in the plan's dtype (float32 or float64)."""
        return {"float32": 4, "float64": 8}[self.dtype]

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
        """The base rate of a parameter: bn_rate for gamma/beta, eta otherwise (a schedule
        multiplies both by the same factor at each step)."""
        return self.bn_rate if name.startswith(("gamma", "beta")) else self.eta

    @property
    def plain_sgd(self) -> bool:
        """True for the article's update: sgd at a constant rate (no optimiser state)."""
        return (self.optimizer.kind == "sgd" and self.schedule.kind == "constant"
                and self.schedule.warmup_epochs == 0)

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
