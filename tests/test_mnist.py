"""One epoch on the real MNIST reaches the article's accuracy (fetched on first use)."""

from __future__ import annotations

import pytest

from fastnn import Config, Trainer


@pytest.mark.mnist
def test_one_article_epoch_on_mnist(mnist) -> None:
    history = Trainer(Config(epochs=1, dtype="float32")).fit(*mnist)
    assert len(history.test_acc) == 2
    assert history.test_acc[0] < 0.3  # an untrained network is near chance
    assert history.test_acc[1] >= 0.93  # the article: 95 % test accuracy by epoch 2
