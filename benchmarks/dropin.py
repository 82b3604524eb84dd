"""fastnn's estimators with their defaults against scikit-learn's, on scikit-learn's data sets.

For each data set: a 70/30 split (stratified for classifiers, ``random_state=0``), each
estimator fitted bare and behind a ``StandardScaler`` in a ``Pipeline``, scored on the 30 %
(accuracy, or R^2 for regressors) and fit time measured around ``fit``, each the median of
``--repeats`` fits (default 3; scikit-learn's unseeded classifier differs from fit to fit).
scikit-learn's ``MLPClassifier()`` / ``MLPRegressor(random_state=0)``
against fastnn's ``MLPClassifier()`` / ``MLPRegressor()`` on each backend of ``--backends``
(the default backend, ``auto``, and numba). The numba backend is warmed up once per network
shape before timing (its kernels compile once per machine and are cached on disk).

    python benchmarks/dropin.py [--backends auto,numba] [--repeats 3] [--rows digits,wine]
        [--markdown]

The last lines give, for each fastnn backend, the worst score difference against scikit-learn
(accuracy and R^2) and the median ratio of fit times.

    python benchmarks/dropin.py --others [--repeats 5] [--markdown]

fits, bare, sets outside the table (made with ``random_state=1``), to check that the defaults
are not fitted to it: seeds 0 to ``--repeats`` - 1 on both sides (``random_state`` and
``seed``), the mean score and median fit time of each, on the default backend.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Row:
    """One data set of the table."""

    name: str
    label: str
    classifier: bool
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


def _standardised(load: Callable[[], tuple[np.ndarray, np.ndarray]]
                  ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def data() -> tuple[np.ndarray, np.ndarray]:
        x, y = load()
        return x, (y - y.mean()) / y.std()
    return data


def _rows() -> list[Row]:
    from sklearn import datasets

    def bunch(loader: Callable[..., Any]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: loader(return_X_y=True)

    return [
        Row("digits", "`load_digits`", True, bunch(datasets.load_digits)),
        Row("breast_cancer", "`load_breast_cancer`", True, bunch(datasets.load_breast_cancer)),
        Row("wine", "`load_wine`", True, bunch(datasets.load_wine)),
        Row("iris", "`load_iris`", True, bunch(datasets.load_iris)),
        Row("classification", "`make_classification(20000, 50, n_informative=20, "
            "n_classes=5)`", True,
            lambda: datasets.make_classification(20000, 50, n_informative=20, n_classes=5,
                                                 random_state=0)),
        Row("diabetes", "`load_diabetes`, target standardised, R^2", False,
            _standardised(bunch(datasets.load_diabetes))),
        Row("regression", "`make_regression(5000, 20, n_informative=10, noise=10)`, target "
            "standardised, R^2", False,
            _standardised(lambda: datasets.make_regression(5000, 20, n_informative=10,
                                                           noise=10, random_state=0))),
        Row("raw_regression", "`make_regression(2000, 20)`, raw target (sd 211), R^2", False,
            lambda: datasets.make_regression(2000, 20, random_state=0)),
    ]


def _other_rows() -> list[Row]:
    """Sets outside the table: small and medium, scaled and not, classes and targets."""
    from sklearn import datasets

    def offset(load: Callable[[], tuple[np.ndarray, np.ndarray]], by: Any
               ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def data() -> tuple[np.ndarray, np.ndarray]:
            x, y = load()
            return x * by[0] + by[1], y
        return data

    return [
        Row("moons", "`make_moons(300, noise=0.3)`", True,
            lambda: datasets.make_moons(300, noise=0.3, random_state=1)),
        Row("circles", "`make_circles(500, noise=0.2, factor=0.5)`", True,
            lambda: datasets.make_circles(500, noise=0.2, factor=0.5, random_state=1)),
        Row("hastie", "`make_hastie_10_2(2000)`", True,
            lambda: datasets.make_hastie_10_2(2000, random_state=1)),
        Row("blobs", "`make_blobs(150, 5, centers=4, cluster_std=3)` + 50", True,
            offset(lambda: datasets.make_blobs(150, 5, centers=4, cluster_std=3,
                                               random_state=1), (1.0, 50.0))),
        Row("unscaled", "`make_classification(400, 8, n_informative=5)`, columns x 1 to 1000",
            True, offset(lambda: datasets.make_classification(400, 8, n_informative=5,
                                                              random_state=1),
                         (np.array([1, 10, 100, 1000, 1, 1, 1, 1.0]), 0.0))),
        Row("friedman1", "`make_friedman1(500, noise=1)`, R^2", False,
            _standardised(lambda: datasets.make_friedman1(500, noise=1, random_state=1))),
        Row("friedman2", "`make_friedman2(300, noise=10)`, R^2", False,
            _standardised(lambda: datasets.make_friedman2(300, noise=10, random_state=1))),
        Row("sparse_uncorrelated", "`make_sparse_uncorrelated(200)`, R^2", False,
            _standardised(lambda: datasets.make_sparse_uncorrelated(200, random_state=1))),
    ]


def _sklearn(classifier: bool, seed: int | None = None) -> Any:
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    if seed is not None:
        return (MLPClassifier if classifier else MLPRegressor)(random_state=seed)
    return MLPClassifier() if classifier else MLPRegressor(random_state=0)


def _fastnn(classifier: bool, backend: str, seed: int = 0) -> Any:
    import fastnn

    cls = fastnn.MLPClassifier if classifier else fastnn.MLPRegressor
    return cls(seed=seed) if backend == "auto" else cls(backend=backend, seed=seed)


def _others(repeats: int, markdown: bool) -> int:
    """The sets outside the table, bare: mean score and median fit time over seeds."""
    from sklearn.model_selection import train_test_split

    rows = _other_rows()
    _warm_up("auto", rows)
    if markdown:
        print("| data | sklearn | fastnn |\n|---|---|---|")
    for row in rows:
        x, y = row.load()
        split = train_test_split(x, y, test_size=0.3, random_state=0,
                                 stratify=y if row.classifier else None)
        cells = []
        for make in (_sklearn, lambda classifier, seed: _fastnn(classifier, "auto", seed)):
            runs = [_fit_and_score(lambda seed=seed, make=make, row=row: make(row.classifier,
                                                                                seed),
                                   False, split, 1)
                    for seed in range(repeats)]
            cells.append(f"{np.mean([score for score, _ in runs]):.3f} "
                         f"({statistics.median(seconds for _, seconds in runs):.2f} s)")
        print(f"| {row.label} | {cells[0]} | {cells[1]} |" if markdown
              else f"{row.name}  sklearn {cells[0]}  fastnn {cells[1]}", flush=True)
    return 0


def _fit_and_score(make: Callable[[], Any], scaled: bool, split: tuple[np.ndarray, ...],
                   repeats: int) -> tuple[float, float]:
    """(median score on the test rows, median fit seconds) of ``repeats`` fits (scikit-learn's
    MLPClassifier() is unseeded: each fit starts elsewhere; fastnn's are all the same)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = split
    times, scores = [], []
    for _ in range(repeats):
        model = make_pipeline(StandardScaler(), make()) if scaled else make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            model.fit(x_train, y_train)
            times.append(time.perf_counter() - start)
            scores.append(float(model.score(x_test, y_test)))
    return statistics.median(scores), statistics.median(times)


def _warm_up(backend: str, rows: list[Row]) -> None:
    """Compile (or load) the numba kernels of the networks the table fits, untimed."""
    if backend == "auto":
        import fastnn

        backend = fastnn.MLPClassifier()._resolved_backend()
    if backend != "numba":
        return
    from sklearn.datasets import make_classification, make_regression

    for classifier in (True, False):
        x, y = (make_classification(300, 8, n_informative=4, random_state=0) if classifier
                else make_regression(300, 8, random_state=0))
        _fastnn(classifier, backend).set_params(max_iter=2).fit(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="auto,numba",
                        help="fastnn backends, comma-separated (auto: the estimators' default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fits per cell (median score and time)")
    parser.add_argument("--rows", default="", help="data sets to run (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--others", action="store_true",
                        help="sets outside the table, seeds 0 to repeats - 1 on both sides")
    args = parser.parse_args(argv)
    if args.others:
        return _others(args.repeats, args.markdown)
    from sklearn.model_selection import train_test_split

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = [row for row in _rows() if not args.rows or row.name in args.rows.split(",")]
    for backend in backends:
        _warm_up(backend, rows)
    header = ["data", "scaler", "sklearn", *[f"fastnn {b}" for b in backends], "sklearn s",
              *[f"{b} s" for b in backends]]
    lines = []
    worst: dict[str, dict[bool, float]] = {b: {True: np.inf, False: np.inf} for b in backends}
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    for row in rows:
        x, y = row.load()
        split = train_test_split(x, y, test_size=0.3, random_state=0,
                                 stratify=y if row.classifier else None)
        for scaled in (False, True):
            ref_score, ref_time = _fit_and_score(lambda row=row: _sklearn(row.classifier),
                                                 scaled, split, args.repeats)
            scores, times = [], []
            for backend in backends:
                score, seconds = _fit_and_score(
                    lambda row=row, backend=backend: _fastnn(row.classifier, backend),
                    scaled, split, args.repeats)
                scores.append(score)
                times.append(seconds)
                worst[backend][row.classifier] = min(worst[backend][row.classifier],
                                                     score - ref_score)
                ratios[backend].append(seconds / ref_time)
            cells = [row.label if args.markdown else row.name, "yes" if scaled else "no",
                     f"{ref_score:.3f}", *[f"{s:.3f}" for s in scores], f"{ref_time:.2f}",
                     *[f"{t:.2f}" for t in times]]
            lines.append(cells)
            if not args.markdown:
                print("  ".join(cells), flush=True)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    for backend in backends:
        print(f"fastnn {backend}: worst accuracy difference {worst[backend][True]:+.3f}, "
              f"worst R^2 difference {worst[backend][False]:+.3f}, median fit time "
              f"{statistics.median(ratios[backend]):.2f}x scikit-learn's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
