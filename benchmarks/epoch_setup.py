"""Shared set-up of the article epoch: train 60k rows at batch 100, then evaluate 60k + 10k."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastnn import Config, Network
from fastnn.train import Trainer

#: the article's measured time per epoch (50 epochs: 3 min 49 s without BN, 4 min 59 s with N)
ARTICLE_SECONDS_PER_EPOCH = {"off": 229 / 50, "bn": 299 / 50}


def mnist_or_synthetic() -> tuple[np.ndarray, ...]:
    """Real MNIST when it is cached (or FASTNN_BENCH_DATA=mnist), else MNIST-shaped noise."""
    from fastnn import datasets

    if os.environ.get("FASTNN_BENCH_DATA", "auto") != "synthetic":
        try:
            return datasets.load_mnist(fetch=os.environ.get("FASTNN_BENCH_DATA") == "mnist")
        except Exception:  # noqa: BLE001 - fall back to synthetic data of the same shape
            pass
    rs = np.random.default_rng(0)
    x = rs.integers(0, 256, (70000, 784), dtype=np.uint8)
    t = rs.integers(0, 10, 70000, dtype=np.uint8)
    return x[:60000], t[:60000], x[60000:], t[60000:]


class ArticleEpoch:
    """One network and its prepared data; ``run(epoch)`` trains one epoch and evaluates."""

    def __init__(self, data: tuple[np.ndarray, ...], **config: Any) -> None:
        self.config = Config(**config)
        self.trainer = Trainer(self.config)
        self.network = Network(self.config)
        self.workspace = self.network.ops.workspace()
        self.train, self.test, _ = self.trainer.prepare(*data, workspace=self.workspace)
        self.trainer.network = self.network
        with self.network.ops.activate(self.workspace):
            self.network.ops.warm_up(self.network.plan)

    def run(self, epoch: int = 1) -> float:
        net, train, test, space = self.network, self.train, self.test, self.workspace
        order = self.trainer.epoch_order(epoch, train.size)
        with np.errstate(all="ignore"), net.ops.activate(space):
            net.train_epoch(train.x, train.t, order, epoch, space)
            net.scores(train.x, train.t, train.labels, space)
            return net.scores(test.x, test.t, test.labels, space)[0]
