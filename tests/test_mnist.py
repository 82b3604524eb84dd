"""One epoch on the real MNIST reaches the article's accuracy (fetched on first use)."""

from __future__ import annotations

import os

import pytest

from fastnn import Config, DataError, Trainer, load_mnist


@pytest.fixture(scope="module")
def mnist():
    offline = os.environ.get("FASTNN_OFFLINE") == "1"
    try:
        return load_mnist(fetch=not offline, progress=lambda line: None)
    except DataError as exc:
        pytest.skip(f"real MNIST not available here: {exc}")


@pytest.mark.mnist
def test_one_article_epoch_on_mnist(mnist) -> None:
    history = Trainer(Config(epochs=1, dtype="float32")).fit(*mnist)
    assert len(history.test_acc) == 2
    assert history.test_acc[0] < 0.3  # an untrained network is near chance
    assert history.test_acc[1] >= 0.93  # the article: 95 % test accuracy by epoch 2
