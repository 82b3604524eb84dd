"""The integer codes of a plan's choices, as compiled kernels take them: the one table.

The numba kernels and the CUDA C kernels (``kernels/fastnn_common.cuh``, whose enums a test
holds to this table) both switch on these numbers; the backends turn a `Plan`'s names into them
here. Add a choice by giving it the next free code in its table and the same enum in the
header.
"""

from __future__ import annotations

#: ``act``: the activation (fastnn.functions.ACTIVATIONS)
ACTIVATION_CODES: dict[str, int] = {
    "sigmoid": 0,
    "tanh": 1,
    "relu": 2,
    "leaky_relu": 3,
    "identity": 4,
    "softplus": 5,
    "softsign": 6,
    "step": 7,
}
#: each activation's code by name, for the kernels that switch on it
(ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_LEAKY_RELU, ACT_IDENTITY, ACT_SOFTPLUS, ACT_SOFTSIGN,
 ACT_STEP) = (ACTIVATION_CODES[name] for name in (
    "sigmoid", "tanh", "relu", "leaky_relu", "identity", "softplus", "softsign", "step"))

#: ``bn``: the batch-norm variant (HiddenSpec.batch_norm); BN_SCALAR is the article's "bn"
BN_OFF, BN_N, BN_SCALAR, BN_NODE = 0, 1, 2, 3
BATCH_NORM_CODES: dict[str, int] = {"off": BN_OFF, "n": BN_N, "bn": BN_SCALAR, "node": BN_NODE}

#: ``stats``: normalise with the batch's own statistics, or with given (mean, var)
STATS_BATCH, STATS_GIVEN = 0, 1
STATS_CODES: dict[str, int] = {"batch": STATS_BATCH, "given": STATS_GIVEN}

#: ``drop``: what a layer's nodes are multiplied by
DROP_NONE, DROP_ARTICLE, DROP_ARTICLE_EVAL, DROP_INVERTED = 0, 1, 2, 3
DROPOUT_CODES: dict[str, int] = {
    "none": DROP_NONE,
    "article": DROP_ARTICLE,  # training: the (d,) 0/1 mask of exactly keep_count ones
    "article_eval": DROP_ARTICLE_EVAL,  # evaluation: times keep
    "inverted": DROP_INVERTED,  # training: per-element Bernoulli(keep) mask times 1/keep
}

#: ``output``: the output function and loss pair (Config.output)
OUTPUT_SOFTMAX, OUTPUT_IDENTITY = 0, 1
OUTPUT_CODES: dict[str, int] = {
    "softmax_cross_entropy": OUTPUT_SOFTMAX,
    "identity_mse": OUTPUT_IDENTITY,
}

#: ``decay``: the weight decay fused into a weight update (Config.weight_decay kind)
DECAY_NONE, DECAY_L1, DECAY_L2 = 0, 1, 2
DECAY_CODES: dict[str | None, int] = {None: DECAY_NONE, "l1": DECAY_L1, "l2": DECAY_L2}

#: ``opt``: the update rule (OptimizerSpec.kind); adamw is adam with decoupled decay
OPT_SGD, OPT_MOMENTUM, OPT_NESTEROV, OPT_ADAM, OPT_ADAMW = 0, 1, 2, 3, 4
OPTIMIZER_CODES: dict[str, int] = {
    "sgd": OPT_SGD,
    "momentum": OPT_MOMENTUM,
    "nesterov": OPT_NESTEROV,
    "adam": OPT_ADAM,
    "adamw": OPT_ADAMW,
}

#: ``transform`` of the CUDA sum_reduce kernel: x, |x|, x^2
TRANSFORM_IDENTITY, TRANSFORM_ABS, TRANSFORM_SQUARE = 0, 1, 2
TRANSFORM_CODES: dict[str, int] = {
    "identity": TRANSFORM_IDENTITY,
    "abs": TRANSFORM_ABS,
    "square": TRANSFORM_SQUARE,
}

#: every table by the name of the C enum prefix it matches in ``fastnn_common.cuh``
TABLES: dict[str, dict] = {
    "ACT": ACTIVATION_CODES,
    "BN": BATCH_NORM_CODES,
    "STATS": STATS_CODES,
    "DROP": DROPOUT_CODES,
    "OUT": OUTPUT_CODES,
    "DECAY": DECAY_CODES,
    "OPT": OPTIMIZER_CODES,
    "TRANSFORM": TRANSFORM_CODES,
}
