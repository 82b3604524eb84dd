"""`fastnn.MLPClassifier` / `fastnn.MLPRegressor` on scikit-learn's estimator contract."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import SkipTestWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

import fastnn  # noqa: E402
from fastnn import Config, MLPClassifier, MLPRegressor, Trainer  # noqa: E402
from fastnn.config import default_of  # noqa: E402
from fastnn.train import DivergenceWarning  # noqa: E402

#: small and quick, yet enough for check_estimator's accuracy and R^2 thresholds
SMALL = dict(hidden=(16,), max_iter=20, batch_size=10)


def blobs(n: int = 240, n_features: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable classes labelled by strings."""
    rs = np.random.default_rng(seed)
    labels = rs.integers(0, 3, n)
    centers = rs.normal(0, 4, (3, n_features))
    x = centers[labels] + rs.normal(0, 1, (n, n_features))
    return x, np.array(["cat", "dog", "eel"])[labels]


def linear(n: int = 300, n_outputs: int | None = None, seed: int = 0):
    """Inputs and targets (N,) or (N, n_outputs) linear in them, with a little noise."""
    rs = np.random.default_rng(seed)
    x = rs.normal(size=(n, 5))
    w = rs.normal(size=(5, n_outputs or 1))
    y = x @ w + 0.05 * rs.normal(size=(n, n_outputs or 1))
    return x, (y[:, 0] if n_outputs is None else y)


def test_importing_fastnn_does_not_import_sklearn() -> None:
    code = (
        "import fastnn, sys; fastnn.MLPClassifier; fastnn.MLPRegressor; "
        "assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert {"MLPClassifier", "MLPRegressor"} <= set(fastnn.__all__)
    assert fastnn.MLPClassifier is fastnn.estimators.MLPClassifier
    with pytest.raises(AttributeError, match="no attribute 'MLPNothing'"):
        fastnn.MLPNothing  # noqa: B018


#: estimator parameters that are not `Config` options of the same name
NOT_OPTIONS = {"max_iter": "epochs", "threads": None, "verbose": None}


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_parameters_are_config_options_with_documented_defaults(cls: type) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    names = [n for n in parameters if n != "self"]
    options = [f.name for f in dataclasses.fields(Config)]
    expected = {n for n in options if n not in ("output", "n_inputs", "n_outputs", "epochs")}
    assert set(names) - set(NOT_OPTIONS) == expected
    for name in names:
        if name in fastnn.estimators.DEFAULTS:
            assert parameters[name].default == fastnn.estimators.DEFAULTS[name], name
        elif name not in NOT_OPTIONS:
            default = default_of(name)
            assert parameters[name].default == (None if default == {} else default), name
    assert parameters["threads"].default is None and parameters["verbose"].default is False

    est = cls()
    assert est.get_params() == {n: p.default for n, p in parameters.items() if n != "self"}
    weights = {"std": 0.1}
    assert est.set_params(eta=0.05, init="normal_w", init_params=weights) is est
    assert est.get_params()["eta"] == 0.05 and est.init_params is weights  # stored unchanged
    assert repr(est) == f"{cls.__name__}(init='normal_w', init_params={{'std': 0.1}}, eta=0.05)"
    with pytest.raises(ValueError, match="Invalid parameter 'learning_rate'"):
        est.set_params(learning_rate=0.1)
    est.set_params(eta=-1.0)  # checked when fitting, not before
    with pytest.raises(ValueError, match="eta must be"):
        est.fit(linear(20)[0], np.arange(20) % 2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or 'auto'"):
        cls(batch_size="big").fit(linear(20)[0], np.arange(20) % 2)
    with pytest.raises(ValueError, match="weight_decay must be none"):
        cls(weight_decay="lots").fit(linear(20)[0], np.arange(20) % 2)


def test_the_defaults_resolve_to_a_config_for_the_data() -> None:
    """batch_size "auto" is min(200, a fifth of the rows), weight_decay "auto" none for a
    classifier and L2 for a regressor, early_stopping True the patience n_iter_no_change
    (convergence on the training loss then off), backend "auto" numba when it loads; biases
    drawn like scikit-learn's."""
    config = MLPClassifier()._build_config(6, 3, 150)
    assert (config.batch_size, config.weight_decay, config.epochs) == (30, None, 200)
    assert config.bias_init == "glorot_uniform_b"
    batches = {rows: MLPClassifier()._build_config(6, 3, rows).batch_size
               for rows in (1, 4, 5, 6, 398, 999, 1000, 1001, 60000)}
    assert batches == {1: 1, 4: 1, 5: 1, 6: 2, 398: 80, 999: 200, 1000: 200, 1001: 200,
                       60000: 200}
    assert (config.optimizer, config.eta, config.normalize) == ("adam", 1e-3, "standard")
    assert (config.tol, config.n_iter_no_change, config.early_stopping) == (1e-4, 10, None)
    assert MLPClassifier()._build_config(6, 3, 5000).batch_size == 200
    assert MLPRegressor()._build_config(6, 1, 5000).weight_decay == ("l2", 0.05)
    stopping = MLPClassifier(early_stopping=True, n_iter_no_change=7)._build_config(6, 3, 500)
    assert (stopping.early_stopping, stopping.n_iter_no_change) == (7, None)
    assert MLPClassifier(early_stopping=3)._build_config(6, 3, 500).early_stopping == 3
    expected = "numba" if fastnn.backends.available()["numba"] is None else "numpy"
    assert MLPClassifier()._build_config(6, 3, 500).backend == expected


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_check_estimator(cls: type) -> None:
    with warnings.catch_warnings():
        # the estimators do not inherit from sklearn.base.BaseEstimator (by design: importing
        # fastnn never imports scikit-learn); some checks train on one-class-like data
        warnings.filterwarnings("ignore", "Estimator .* does not inherit", UserWarning)
        warnings.filterwarnings("ignore", category=DivergenceWarning)
        warnings.filterwarnings("ignore", category=SkipTestWarning)  # no pandas, no array API
        # as for scikit-learn's own MLPs: mini-batches see repeated rows in other batches
        # than weighted ones, so weights equal repetition only in expectation (a full-batch
        # step is exact: test_sample_weight_is_the_weighted_mean_loss)
        unequal = "sample_weight is not equivalent to removing or repeating rows"
        check_estimator(cls(**SMALL), expected_failed_checks={
            "check_sample_weight_equivalence_on_dense_data": unequal,
            "check_sample_weight_equivalence_on_sparse_data": unequal,
        })


def test_classifier_string_labels_and_same_run_as_trainer() -> None:
    x, y = blobs()
    clf = MLPClassifier(**SMALL, dropout_hidden=0.8)
    assert clf.fit(x, y) is clf
    assert list(clf.classes_) == ["cat", "dog", "eel"]
    assert clf.n_features_in_ == 6 and clf.n_iter_ == 20 and clf.history_.epochs == 20

    codes = np.searchsorted(clf.classes_, y)
    config = Config(hidden=(16,), epochs=20, batch_size=10, dropout_hidden=0.8, n_inputs=6,
                    n_outputs=3, init="glorot_uniform", bias_init="glorot_uniform_b",
                    normalize="standard", optimizer="adam", eta=1e-3, tol=1e-4,
                    n_iter_no_change=10, dtype="float32", train_figures="running",
                    backend=clf._resolved_backend())
    trainer = Trainer(config)
    history = trainer.fit(x, codes)
    assert clf.history_.train_loss == history.train_loss
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(proba, trainer.predict_proba(x), rtol=1e-6)  # renormalised
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(clf.predict_log_proba(x), np.log(proba))
    predicted = clf.predict(x)
    np.testing.assert_array_equal(predicted, clf.classes_[proba.argmax(axis=1)])
    assert clf.score(x, y) == np.mean(predicted == y) > 0.95


def test_images_are_flattened() -> None:
    x, y = blobs(n_features=12)
    flat = MLPClassifier(**SMALL).fit(x, y)
    images = MLPClassifier(**SMALL).fit(x.reshape(-1, 3, 4), y)
    assert images.n_features_in_ == 12
    np.testing.assert_array_equal(images.predict_proba(x.reshape(-1, 3, 4)), flat.predict_proba(x))


def test_partial_fit_continues_the_epochs_of_one_run() -> None:
    """partial_fit k times trains exactly as fit with epochs=k (shuffle order and dropout masks
    of epochs 1..k, one normaliser), and it goes on after fit too."""
    x, y = blobs()
    settings = dict(hidden=(16,), batch_size=10, dropout_hidden=0.8)
    whole = MLPClassifier(**settings, max_iter=3).fit(x, y)
    steps = MLPClassifier(**settings, max_iter=50)  # max_iter does not matter to partial_fit
    for k in range(1, 4):
        steps.partial_fit(x, y, classes=["eel", "dog", "cat"] if k == 1 else None)
        assert steps.n_iter_ == k and steps.history_.epochs == k
    assert steps.history_.train_loss == whole.history_.train_loss
    np.testing.assert_array_equal(steps.predict_proba(x), whole.predict_proba(x))

    after_fit = MLPClassifier(**settings, max_iter=2).fit(x, y).partial_fit(x, y)
    np.testing.assert_array_equal(after_fit.predict_proba(x), whole.predict_proba(x))

    # the normaliser of the first call is kept: another batch's scale does not refit it
    norm = steps._normalizer
    shift, scale = norm.shift, norm.scale
    steps.partial_fit(10 * x[:50], y[:50])
    assert np.array_equal(steps._normalizer.shift, shift)
    assert np.array_equal(steps._normalizer.scale, scale)
    assert steps.n_iter_ == 4


def test_early_stopping_keeps_the_best_epoch_and_partial_fit_goes_on() -> None:
    x, y = blobs(n=300)
    rs = np.random.default_rng(1)  # 30 % of the labels drawn at random: it overfits soon
    y = np.where(rs.random(len(y)) < 0.3, rs.choice(["cat", "dog", "eel"], len(y)), y)
    clf = MLPClassifier(hidden=(16,), batch_size=10, max_iter=60, eta=0.5, early_stopping=2,
                        validation_fraction=0.2, optimizer="sgd").fit(x, y)
    events = clf.history_.events
    assert clf.n_iter_ == events["stopped_early_at"] < 60
    assert events["restored_best_epoch"] == events["best_val_epoch"] < clf.n_iter_
    assert len(clf.history_.val_loss) == clf.n_iter_ + 1
    clf.partial_fit(x, y)  # one more epoch, from the kept model, numbered after the last
    assert clf.n_iter_ == events["stopped_early_at"] + 1
    assert "stopped_early_at" not in clf.history_.events
    assert "restored_best_epoch" not in clf.history_.events


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")  # one epoch on 20 rows
def test_partial_fit_checks_classes_and_features() -> None:
    x, y = blobs()
    clf = MLPClassifier(**SMALL)
    with pytest.raises(ValueError, match="classes must be given"):
        clf.partial_fit(x, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        clf.partial_fit(x, y, classes=["cat"])
    clf.partial_fit(x[:20], y[:20], classes=["cat", "dog", "eel"])
    with pytest.raises(ValueError, match="not the same"):
        clf.partial_fit(x, y, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(x, np.where(y == "cat", "cow", y))
    with pytest.raises(ValueError, match="X has 5 features, but MLPClassifier is expecting 6"):
        clf.partial_fit(x[:, :5], y)
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier(**SMALL).fit(x, np.linspace(0, 1, len(x)))


@pytest.mark.parametrize("n_outputs", [None, 1, 3])
def test_regressor_targets_1d_and_2d(n_outputs: int | None) -> None:
    x, y = linear(n_outputs=n_outputs)
    reg = MLPRegressor(hidden=(16,), max_iter=30, batch_size=10, eta=0.05, normalize="z_score",
                       n_iter_no_change=None)
    reg.fit(x, y)
    assert reg.n_outputs_ == (n_outputs or 1)
    predicted = reg.predict(x)
    assert predicted.shape == y.shape and predicted.dtype == np.float64
    assert reg.score(x, y) > 0.95
    reg.partial_fit(x, y)
    assert reg.n_iter_ == 31 and reg.predict(x).shape == y.shape
    with pytest.raises(ValueError, match="outputs"):
        reg.partial_fit(x, np.zeros((len(x), (n_outputs or 1) + 1)))


def test_regressor_divergence_is_a_non_finite_loss_only() -> None:
    """The Trainer's "predicts one class" check means nothing for a regression (one output
    always does): a slowly learning regressor does not warn; a non-finite loss does, and
    stop_on_divergence ends the run there."""
    x, y = linear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        slow = MLPRegressor(hidden=(8,), max_iter=3, eta=1e-6, stop_on_divergence=True).fit(x, y)
    assert slow.n_iter_ == 3 and "diverged_at" not in slow.history_.events

    wild = MLPRegressor(hidden=(8,), max_iter=40, eta=1e4, stop_on_divergence=True,
                        optimizer="sgd", weight_decay=None)
    with pytest.warns(DivergenceWarning, match=r"non-finite loss.*stopping") as caught:
        wild.fit(x, 1000 * y)
    assert [w.filename for w in caught if w.category is DivergenceWarning] == [__file__]
    events = wild.history_.events
    assert events["divergence"] == "non-finite loss"
    assert events["stopped_on_divergence_at"] == events["diverged_at"] == wild.n_iter_ < 40
    assert not np.isfinite(wild.history_.train_loss[-1])


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_pickle_keeps_plain_arrays_and_continues(cls: type) -> None:
    x, y = blobs()
    if cls is MLPRegressor:
        y = (y == "dog").astype(float)
    est = cls(**SMALL, dropout_hidden=0.8).fit(x, y)
    twin = pickle.loads(pickle.dumps(est))
    assert "_net" not in twin.__dict__  # no backend object travels
    np.testing.assert_array_equal(twin.predict(x), est.predict(x))
    assert twin.history_.train_loss == est.history_.train_loss
    twin.partial_fit(x, y)
    est.partial_fit(x, y)
    np.testing.assert_array_equal(twin.predict(x), est.predict(x))
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(clone(est), "n_iter_")


def test_grid_search_over_a_pipeline_on_digits() -> None:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    # the scaler normalises: the network takes its output as it is (normalize="none")
    mlp = MLPClassifier(max_iter=10, hidden=(32,), normalize="none")
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    search = GridSearchCV(pipe, {"mlp__eta": [1e-3, 1e-2]}, cv=3).fit(x_train, y_train)
    assert search.best_params_["mlp__eta"] in (1e-3, 1e-2)
    assert search.best_estimator_.named_steps["mlp"].n_iter_ == 10
    assert search.score(x_test, y_test) > 0.85


# ---- data that is not MNIST ----

def test_an_unscaled_regression_target_trains_and_is_predicted_in_its_units() -> None:
    from sklearn.datasets import make_regression
    from sklearn.model_selection import cross_val_score

    x, y = make_regression(2000, 20, random_state=0)
    assert y.std() > 100
    reg = MLPRegressor(max_iter=30).fit(x[:1400], y[:1400])
    assert np.all(np.isfinite(reg.loss_curve_)) and "diverged_at" not in reg.history_.events
    assert reg.score(x[1400:], y[1400:]) > 0.9
    assert abs(reg.predict(x[1400:]).std() / y[1400:].std() - 1) < 0.1  # the target's units
    scores = cross_val_score(MLPRegressor(max_iter=20), x, y, cv=3)
    assert np.all(np.isfinite(scores)) and scores.min() > 0.8


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_a_constant_column_in_the_first_partial_fit_chunk(cls: type) -> None:
    """The per-column standardisation gives a constant column scale 1: later chunks in which
    it varies train on as the first did (a z-score's scale floor of 1e-7 blew them up)."""
    x, y = blobs(n=600)
    if cls is MLPRegressor:
        y = x[:, 0] - 2 * x[:, 1]
    x = x.copy()
    x[:200, 3] = 5.0  # constant in the first chunk
    x[200:, 3] = np.random.default_rng(0).normal(5.0, 1.0, 400)

    def chunked(**settings: object) -> MLPClassifier | MLPRegressor:
        # each chunk's loss evaluated after it (a running mean mixes the chunks' steps)
        est = cls(hidden=(16,), batch_size=20, eta=1e-2, train_figures="evaluate", **settings)
        for start in (0, 200, 400):
            chunk = slice(start, start + 200)
            if cls is MLPClassifier:
                est.partial_fit(x[chunk], y[chunk], classes=np.unique(y))
            else:
                est.partial_fit(x[chunk], y[chunk])
        return est

    est = chunked()
    assert est._normalizer.scale[3] == 1.0 and est._normalizer.shift[3] == 5.0
    curve = est.loss_curve_
    assert np.all(np.isfinite(curve)) and curve[0] > curve[1] > curve[2]
    floored = chunked(normalize="z_score", normalize_axis=0).loss_curve_
    assert floored[2] > 5 * curve[2]


def test_standardisation_is_a_no_op_behind_a_standard_scaler() -> None:
    x, y = blobs()
    scaled = StandardScaler().fit_transform(x)
    normalizer = fastnn.preprocessing.Normalizer("standard").fit(scaled)
    assert np.all(normalizer.shift == 0.0) and np.all(normalizer.scale == 1.0)
    np.testing.assert_array_equal(normalizer.transform(scaled), scaled)
    piped = Pipeline([("s", StandardScaler()), ("m", MLPClassifier(**SMALL))]).fit(x, y)
    bare = MLPClassifier(**SMALL).fit(scaled, y)
    np.testing.assert_array_equal(piped.predict_proba(x), bare.predict_proba(scaled))


def test_sample_weight_is_the_weighted_mean_loss() -> None:
    """One full-batch epoch with integer weights equals one on the rows repeated that often
    (the batch's weighted mean loss is the repeated rows' mean loss)."""
    x, y = blobs(n=30)
    codes = np.searchsorted(np.unique(y), y)
    weights = np.arange(30) % 4  # some rows weigh nothing
    repeated = np.repeat(np.arange(30), weights)
    settings = dict(hidden=(5,), n_inputs=6, n_outputs=3, epochs=1, shuffle=False,
                    normalize="none", eta=0.1)
    weighted = Trainer(Config(**settings, batch_size=30))
    weighted.fit(x, codes, sample_weight=weights)
    plain = Trainer(Config(**settings, batch_size=len(repeated)))
    plain.fit(x[repeated], codes[repeated])
    for name, value in plain.network.numpy_params().items():
        np.testing.assert_allclose(weighted.network.numpy_params()[name], value, rtol=1e-12,
                                   atol=1e-14, err_msg=name)


def test_sample_weight_in_the_estimators() -> None:
    x, y = blobs(n=300)
    rs = np.random.default_rng(2)
    noisy = rs.random(len(y)) < 0.4
    y_noisy = np.where(noisy, rs.choice(["cat", "dog", "eel"], len(y)), y)
    clean = MLPClassifier(**SMALL).fit(x, y_noisy, sample_weight=(~noisy).astype(float))
    assert clean.score(x, y) >= MLPClassifier(**SMALL).fit(x, y_noisy).score(x, y)
    reg = MLPRegressor(**SMALL).fit(*linear(), sample_weight=np.ones(300))
    assert reg.score(*linear()) > 0.9
    with pytest.raises(fastnn.errors.DataError, match="one weight per training row"):
        MLPClassifier(**SMALL).fit(x, y, sample_weight=np.ones(5))
    with pytest.raises(fastnn.errors.DataError, match="finite and >= 0"):
        MLPClassifier(**SMALL).fit(x, y, sample_weight=-np.ones(300))
    with pytest.raises(fastnn.errors.DataError, match="every weight is zero"):
        MLPClassifier(**SMALL).fit(x, y, sample_weight=np.zeros(300))


def test_convergence_and_the_fitted_curves(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = blobs()
    clf = MLPClassifier(hidden=(16,), tol=1e-2, n_iter_no_change=2, verbose=True).fit(x, y)
    assert clf.history_.events["converged_at"] == clf.n_iter_ < 200
    assert len(clf.loss_curve_) == clf.n_iter_ and clf.best_loss_ == min(clf.loss_curve_)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == clf.n_iter_ and lines[0].startswith("Iteration 1, loss = ")
    stopped = MLPClassifier(hidden=(16,), early_stopping=True, n_iter_no_change=3).fit(x, y)
    assert len(stopped.validation_loss_curve_) == stopped.n_iter_


def test_without_scikit_learn_the_estimators_say_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fastnn.errors import MissingDependency

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    for call in (lambda: fastnn.MLPClassifier().fit(x, y),
                 lambda: fastnn.MLPRegressor().fit(x, y.astype(float)),
                 lambda: fastnn.MLPClassifier().predict(x)):
        with pytest.raises(MissingDependency, match="need scikit-learn: pip install scikit-learn"):
            call()
