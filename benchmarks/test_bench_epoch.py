"""Epoch time of the article's workload per backend, batch norm off/on, float32/float64.

Run: ``pytest benchmarks/test_bench_epoch.py --benchmark-only``. The article's own per-epoch time
is recorded beside each result (``extra_info``) with the speed-up over it.
"""

from __future__ import annotations

import pytest
from epoch_setup import ARTICLE_SECONDS_PER_EPOCH, ArticleEpoch, mnist_or_synthetic

from fastnn.backends import available

BACKENDS = [name for name, reason in available().items() if reason is None and name != "cupy"]


@pytest.fixture(scope="module")
def data():
    return mnist_or_synthetic()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", ["off", "bn"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_article_epoch(benchmark, data, backend: str, batch_norm: str, dtype: str) -> None:
    epoch = ArticleEpoch(data, backend=backend, batch_norm=batch_norm, dtype=dtype)
    counter = iter(range(1, 1000))
    accuracy = benchmark.pedantic(
        lambda: epoch.run(next(counter)), rounds=3, iterations=1, warmup_rounds=0
    )
    article = ARTICLE_SECONDS_PER_EPOCH[batch_norm]
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(
            article_seconds=article, speedup_vs_article=article / benchmark.stats["median"]
        )
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", ["off", "bn"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size", [100, 1000])
@pytest.mark.parametrize("hidden", [(100, 50), (1024, 512)], ids=["100-50", "1024-512"])
def test_scaling_epoch(
    benchmark, data, backend: str, batch_norm: str, dtype: str, batch_size: int,
    hidden: tuple[int, ...],
) -> None:
    """The scaling table: a wider network and a larger batch (one round each; compare.py
    --hidden/--batch-sizes puts PyTorch beside them)."""
    epoch = ArticleEpoch(data, backend=backend, batch_norm=batch_norm, dtype=dtype,
                         hidden=hidden, batch_size=batch_size)
    counter = iter(range(1, 1000))
    accuracy = benchmark.pedantic(
        lambda: epoch.run(next(counter)), rounds=1, iterations=1, warmup_rounds=0
    )
    assert 0.0 <= accuracy <= 1.0
