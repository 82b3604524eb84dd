"""An independent, plain-NumPy transcription of the article's trainer (ARTICLE.md 2-3).

Written straight from the specification, sharing no code with fastnn's training math, so that
fastnn's results can be held to "the article's numbers, to round-off".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ACT = {
    "relu": (lambda u: np.maximum(u, 0.0), lambda u: (u > 0).astype(float)),
    "sigmoid": (
        lambda u: 1 / (1 + np.exp(-u)),
        lambda u: (1 / (1 + np.exp(-u))) * (1 - 1 / (1 + np.exp(-u))),
    ),
    "tanh": (np.tanh, lambda u: 1 - np.tanh(u) ** 2),
    "leaky_relu": (lambda u: np.where(u > 0, u, 0.1 * u), lambda u: np.where(u > 0, 1.0, 0.1)),
    "identity": (lambda u: u, lambda u: np.ones_like(u)),
    "softplus": (lambda u: np.log(1 + np.exp(u)), lambda u: 1 / (1 + np.exp(-u))),
    "softsign": (lambda u: u / (1 + np.abs(u)), lambda u: 1 / (1 + np.abs(u)) ** 2),
    "step": (lambda u: (u > 0).astype(float), lambda u: np.zeros_like(u)),
}


def article_run(
    x_train: np.ndarray,
    t_train: np.ndarray,
    x_test: np.ndarray,
    t_test: np.ndarray,
    W: dict[int, np.ndarray],
    b: dict[int, np.ndarray],
    *,
    eta: float = 0.1,
    batch_size: int = 100,
    epochs: int = 2,
    act: str = "relu",
    wd: tuple[str, float] | None = None,
    keep_in: float = 1.0,
    keep_mid: float = 1.0,
    bn: str = "off",
    bn_eta: float | None = None,
    order: Callable[[int, int], np.ndarray] | None = None,
    mask: Callable[[int, int, int], np.ndarray] | None = None,
    mse: bool = False,
) -> dict[str, list[float]]:
    """Train as the article does; x already normalised, t one-hot. Returns the four histories."""
    f, df = ACT[act]
    L = len(W)
    W = {k: v.copy() for k, v in W.items()}
    b = {k: v.copy() for k, v in b.items()}
    d = {k: W[k].shape[1] for k in W}
    shape = {"bn": (1,), "node": None}
    gamma = {k: np.ones(shape[bn] or (d[k],)) for k in range(1, L)} if bn in shape else {}
    beta = {k: np.zeros(shape[bn] or (d[k],)) for k in range(1, L)} if bn in shape else {}
    bn_eta = eta if bn_eta is None else bn_eta

    def forward(x, masks, train):
        keep = {0: keep_in, **{k: keep_mid for k in range(1, L)}}
        z = {0: x * masks[0] if train and 0 in masks else (x * keep_in if keep_in < 1 else x)}
        cache = {}
        for k in range(1, L + 1):
            u = z[k - 1] @ W[k] + b[k]
            if k == L:
                if mse:
                    return u, z, cache
                e = np.exp(u - u.max(axis=1, keepdims=True))
                return e / e.sum(axis=1, keepdims=True), z, cache
            y = u
            if bn != "off":
                mu = u.mean(axis=0)
                s = np.maximum(np.sqrt(((u - mu) ** 2).mean(axis=0)), 1e-7)
                uh = (u - mu) / s
                y = gamma[k] * uh + beta[k] if gamma else uh
                cache[k] = (uh, s)
            cache[("y", k)] = y
            a = f(y)
            if train and k in masks:
                a = a * masks[k]
            elif keep[k] < 1:
                a = a * keep[k]
            z[k] = a

    def penalty():
        if wd is None:
            return 0.0
        return sum(
            wd[1] * np.abs(W[k]).sum() if wd[0] == "l1" else wd[1] / 2 * (W[k] ** 2).sum()
            for k in W
        )

    def evaluate(x, t):
        y, _, _ = forward(x, {}, False)
        if mse:
            loss = 0.5 * ((y - t) ** 2).sum() / len(x) + penalty()
        else:
            loss = -(t * np.log(np.maximum(y, 1e-7))).sum() / len(x) + penalty()
        return float((y.argmax(1) == t.argmax(1)).mean()), float(loss)

    hist = {"train_acc": [], "train_loss": [], "test_acc": [], "test_loss": []}

    def record():
        for name, (x, t) in (("train", (x_train, t_train)), ("test", (x_test, t_test))):
            acc, loss = evaluate(x, t)
            hist[f"{name}_acc"].append(acc)
            hist[f"{name}_loss"].append(loss)

    record()
    n = len(x_train)
    for epoch in range(1, epochs + 1):
        idx = order(epoch, n) if order else np.arange(n)
        for step, start in enumerate(range(0, n, batch_size)):
            sel = idx[start : start + batch_size]
            x, t = x_train[sel], t_train[sel]
            masks = {}
            if mask is not None:
                if keep_in < 1:
                    masks[0] = mask(epoch, step, 0)
                for k in range(1, L):
                    if keep_mid < 1:
                        masks[k] = mask(epoch, step, k)
            y, z, cache = forward(x, masks, True)
            delta = (y - t) / len(x)
            grads = {}
            for k in range(L, 0, -1):
                grads[("W", k)] = z[k - 1].T @ delta + (
                    0 if wd is None else (wd[1] * np.sign(W[k]) if wd[0] == "l1" else wd[1] * W[k])
                )
                grads[("b", k)] = delta.sum(axis=0)
                if k == 1:
                    break
                dz = delta @ W[k].T
                if k - 1 in masks:
                    dz = dz * masks[k - 1]
                dy = dz * df(cache[("y", k - 1)])
                if bn != "off":
                    uh, s = cache[k - 1]
                    g = gamma[k - 1] * dy if gamma else dy
                    delta = (g - g.mean(axis=0) - uh * (g * uh).mean(axis=0)) / s
                    if gamma:
                        dg, db_ = (uh * dy).sum(axis=0), dy.sum(axis=0)
                        if bn == "bn":
                            dg, db_ = (
                                dg.sum(keepdims=True) / d[k - 1],
                                db_.sum(keepdims=True) / d[k - 1],
                            )
                        grads[("gamma", k - 1)], grads[("beta", k - 1)] = dg, db_
                else:
                    delta = dy
            for k in range(1, L + 1):
                W[k] -= eta * grads[("W", k)]
                b[k] -= eta * grads[("b", k)]
            for k in gamma:
                gamma[k] -= bn_eta * grads[("gamma", k)]
                beta[k] -= bn_eta * grads[("beta", k)]
        record()
    return hist
