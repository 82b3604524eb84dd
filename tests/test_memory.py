"""The memory a run needs: the estimate `fit` makes before any work, and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastnn import Config, DataError, Trainer, memory
from fastnn.cli import main
from fastnn.plan import Plan

TINY = ["--hidden", "8", "--epochs", "1", "--batch-size", "50", "--quiet"]


def _limit(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make the machine report ``free`` bytes available."""
    monkeypatch.setattr(memory, "available_memory", lambda: free)


def test_available_memory_is_a_positive_count_here() -> None:
    free = memory.available_memory()
    assert free is None or (isinstance(free, int) and free > 0)


def test_the_estimate_counts_each_part_of_a_run() -> None:
    """The parts are the normalised copies, targets, order, evaluation and (with early
    stopping) the validation split's copy of the raw x_train."""
    config = Config(hidden=(20, 10), n_inputs=30, n_outputs=3, dtype="float64",
                    early_stopping=2, batch_norm="bn")
    x_train, x_test = np.zeros((1000, 30), np.uint8), np.zeros((200, 30), np.uint8)
    parts = Trainer(config).run_memory([x_train, x_test]).parts
    assert parts["inputs normalised to float64"] == 1200 * 30 * 8
    assert parts["targets"] == 1200 * 3 * 8
    assert parts["shuffled order"] == 2 * 1000 * 8
    assert parts["the validation split's copy of x_train"] == 1000 * 30
    plan = Plan.from_config(config)
    # a layer at a time, the widest: layer 1's u, u_hat, y and z (4 x 20; layer 2's input
    # beside its four arrays is 20 + 4 x 10)
    assert parts["evaluation"] == 1000 * 4 * 20 * 8 == \
        Trainer(config)._ops().evaluation_bytes(plan, 1000)
    z_score = Trainer(Config(n_inputs=30, n_outputs=3, normalize="z_score")).run_memory(
        [x_train])
    assert z_score.parts["z_score's float64 copy of x_train"] == 1000 * 30 * 8
    plain = Trainer(Config(hidden=(20, 10), n_inputs=30, n_outputs=3)).run_memory([x_train])
    assert "the validation split's copy of x_train" not in plain.parts
    assert plain.parts["evaluation"] == 1000 * (2 * 20 + 0) * 8  # layer 1's u and z
    dropped = Trainer(Config(hidden=(20, 10), n_inputs=30, n_outputs=3, dropout_input=0.8))
    assert dropped.run_memory([x_train]).parts["evaluation"] == 1000 * (2 * 20 + 30) * 8


def test_describe_names_the_large_parts_largest_first() -> None:
    gib = memory.GIB
    run = memory.RunMemory({"small": 10, "inputs": 3 * gib, "evaluation": gib // 2})
    assert run.total == 3 * gib + gib // 2 + 10
    assert run.describe() == "inputs 3.0 GiB, evaluation 512 MiB"
    assert memory.RunMemory({"none": 0}).describe() == "small parts"
    assert memory.gib(3 * 1024) == "3 KiB"


def test_fit_refuses_before_any_work_when_the_run_needs_more_than_is_free(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(0).integers(0, 255, (500, 40), np.uint8)
    t = np.arange(500) % 4
    config = Config(hidden=(8,), n_inputs=40, n_outputs=4, epochs=1, dtype="float64")
    trainer = Trainer(config)
    needed = trainer.run_memory([x]).total
    _limit(monkeypatch, needed - 1)
    with pytest.raises(DataError, match=r"this run \(.*inputs normalised to float64 156 KiB.*\) "
                                         r"needs about \d+ KiB, more than the \d+ KiB this machine "
                                         r"has free; train in float32 \(dtype\), or on fewer rows"):
        trainer.fit(x, t)
    assert trainer.normalizer is None and trainer.history.epochs == 0  # nothing was done
    _limit(monkeypatch, needed + 2**20)  # the network and the run both fit: it trains
    assert Trainer(config).fit(x, t).epochs == 1


def test_the_refusal_of_a_float32_run_does_not_suggest_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 1)
    with pytest.raises(DataError, match="free; train on fewer rows, or free memory"):
        Trainer(Config(hidden=(4,), n_inputs=3, n_outputs=2, epochs=1,
                       dtype="float32")).prepare(
            np.ones((10, 3)), np.arange(10) % 2)


def test_the_network_itself_is_refused_when_it_does_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 1000)
    from fastnn import ConfigError, Network

    with pytest.raises(ConfigError, match=r"the network \(1,105 parameters in float64\) needs"):
        Network(Config(hidden=(100,), n_inputs=5, n_outputs=5))


def test_the_command_line_says_the_figure_and_exits_2(
        idx_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(Trainer, "run_memory",
                        lambda self, xs: memory.RunMemory({"inputs": 40 * memory.GIB}))
    _limit(monkeypatch, 3 * memory.GIB)
    assert main(["train", "--data", str(idx_folder), *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("fastnn: error: this run (inputs 40.0 GiB) needs about 40.0 GiB, more than "
                     "the 3.0 GiB this machine has free; train on fewer rows, or free memory")


def test_numba_refuses_a_sparse_form_that_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    from fastnn.backends import get_backend

    ops = get_backend("numba")
    x = np.zeros((300, 50), np.float32)
    x[:, ::10] = 1.0  # 10 % nonzero: the sparse form is built
    _limit(monkeypatch, 300 * 5 * 8 - 1)
    workspace = ops.workspace()
    with pytest.raises(DataError, match=r"the sparse form of 300 input rows \(1,500 nonzeros\) "
                                        r"needs about"):
        ops.prepare_inputs(x, workspace)
    assert workspace.prepared(x) is None
    _limit(monkeypatch, 2**30)
    ops.prepare_inputs(x, workspace)
    assert workspace.prepared(x)[1].sparse


def test_evaluation_in_blocks_holds_whole_set_arrays_only_for_batch_norm() -> None:
    pytest.importorskip("numba")
    from fastnn.backends import get_backend

    ops = get_backend("numba")
    config = Config(hidden=(20, 10), n_inputs=30, n_outputs=3)
    assert ops.evaluation_bytes(Plan.from_config(config), 1000) == 0
    with_bn = Plan.from_config(Config(hidden=(20, 10), n_inputs=30, n_outputs=3,
                                      batch_norm="n"))
    reference = get_backend("numpy").evaluation_bytes(with_bn, 1000)
    # batch statistics of the whole set: the population statistics after the last epoch
    # build the dense inputs and the reference's activations
    assert ops.evaluation_bytes(with_bn, 1000) == 1000 * 30 * 8 + reference  # float64
    running = Plan.from_config(Config(hidden=(20, 10), n_inputs=30, n_outputs=3,
                                      batch_norm="n", bn_eval="running"))
    assert ops.evaluation_bytes(running, 1000) == 1000 * 30 * 8  # the hidden layers' only
    assert ops.inputs_bytes(with_bn, 1000) == 0  # checked when their form is known


@pytest.mark.parametrize("keep", [False, True])
def test_a_fit_lets_its_normalised_copies_go_unless_asked_to_keep_them(keep: bool) -> None:
    x = np.random.default_rng(1).integers(0, 255, (200, 12), np.uint8)
    trainer = Trainer(Config(hidden=(6,), n_inputs=12, n_outputs=3, epochs=1),
                      keep_splits=keep)
    trainer.fit(x, np.arange(200) % 3)
    if keep:
        np.testing.assert_array_equal(trainer.splits[0].x, trainer.normalizer.transform(x))
    else:
        assert trainer.splits is None


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_fit_on_a_memmap_gives_the_history_of_the_array_in_memory(
        backend: str, tmp_path: Path) -> None:
    """The inputs are read where they lie (numba builds its CSR form a block at a time from
    the map); the figures are those of the same bytes in memory, bit for bit."""
    if backend == "numba":
        pytest.importorskip("numba")
    generator = np.random.default_rng(3)
    x = (generator.integers(1, 256, (600, 50)) * (generator.random((600, 50)) < 0.2)).astype(
        np.uint8)
    t = generator.integers(0, 4, 600)
    path = tmp_path / "x.u8"
    written = np.memmap(path, np.uint8, "w+", shape=x.shape)
    written[:] = x
    written.flush()
    mapped = np.memmap(path, np.uint8, "r", shape=x.shape)
    config = Config(hidden=(16,), n_inputs=50, n_outputs=4, epochs=2, backend=backend,
                    dtype="float32")
    histories = [Trainer(config).fit(inputs, t, inputs[:100], t[:100]).to_dict()
                 for inputs in (x, mapped)]
    for history in histories:
        history.pop("epoch_seconds")
    assert histories[0] == histories[1]


@pytest.mark.parametrize("density", [0.1, 0.6])
def test_numba_refuses_the_form_it_settles_on_before_making_it(
        monkeypatch: pytest.MonkeyPatch, density: float) -> None:
    """Sparse inputs: their CSR form (a byte and an index per nonzero for uint8); dense ones:
    the normalised array."""
    pytest.importorskip("numba")
    from fastnn.backends import get_backend
    from fastnn.preprocessing import Normalizer

    ops = get_backend("numba")
    generator = np.random.default_rng(2)
    raw = (generator.integers(1, 256, (400, 20)) * (generator.random((400, 20)) < density)
           ).astype(np.uint8)
    normalizer = Normalizer().fit(raw)
    nonzeros = int(np.count_nonzero(raw))
    needed = nonzeros * 5 + 8 * 400 if density < 0.35 else raw.size * 8
    _limit(monkeypatch, needed - 1)
    what = (f"the sparse form of 400 input rows \\({nonzeros:,} nonzeros\\)" if density < 0.35
            else "x_train normalised to float64")
    with pytest.raises(DataError, match=what + " needs about .* free; train in float32"):
        ops.inputs(raw, normalizer, "float64", "x_train", ops.workspace())
    _limit(monkeypatch, needed)
    made = ops.inputs(raw, normalizer, "float64", "x_train", ops.workspace())
    _limit(monkeypatch, 2**30)
    np.testing.assert_array_equal(np.asarray(made), normalizer.transform(raw))


def test_a_csr_rows_gives_its_rows_and_refuses_a_dense_array_that_does_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    from fastnn.backends import get_backend
    from fastnn.backends.numba.inputs import CsrRows
    from fastnn.preprocessing import Normalizer

    raw = np.zeros((30, 8), np.uint8)
    raw[::3, 2], raw[1::4, 5] = 200, 17
    normalizer = Normalizer().fit(raw)
    rows = get_backend("numba").inputs(raw, normalizer, "float32", "x", get_backend(
        "numba").workspace())
    assert isinstance(rows, CsrRows)
    dense = normalizer.transform_to(raw, "float32")
    for index in (3, slice(2, 9), np.array([[0, 4], [29, 3]]), -1):
        np.testing.assert_array_equal(rows[index], dense[index])
    with pytest.raises(ValueError, match="no dense array to share"):
        np.asarray(rows, copy=False)
    _limit(monkeypatch, 100)
    with pytest.raises(DataError, match="the dense array of 30 normalised input rows needs"):
        rows.dense()


# ---- the numpy backend: raw rows, normalised a batch or a block at a time ----


def _normaliser(x: np.ndarray, method: str = "z_score") -> Any:
    from fastnn.preprocessing import Normalizer

    return Normalizer(method).fit(x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_normalised_rows_give_the_bits_of_the_whole_normalised_array(dtype: str) -> None:
    """Gathered rows, blocks (at least BLOCK_ROWS rows, the short last one joined to the one
    before) and the dense array are `Normalizer.transform_to`'s values, bit for bit."""
    from fastnn.backends.normalised_rows import BLOCK_ROWS, NormalisedRows

    gen = np.random.default_rng(5)
    x = gen.integers(0, 256, (2 * BLOCK_ROWS + 1234, 7), np.uint8)
    normalizer = _normaliser(x)
    whole = normalizer.transform_to(x, dtype)
    rows = NormalisedRows(x, normalizer, dtype, "x_train")
    assert rows.shape == x.shape and len(rows) == len(x) and rows.dtype == np.dtype(dtype)
    index = gen.permutation(len(x))[:300]
    np.testing.assert_array_equal(rows[index], whole[index])
    assert rows[index].dtype == np.dtype(dtype)
    blocks = list(rows.blocks())
    assert [(b.start, b.stop) for b, _ in blocks] == [(0, BLOCK_ROWS), (BLOCK_ROWS, len(x))]
    np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), whole)
    assert [(b.start, b.stop) for b, _ in rows.blocks(len(x))] == [(0, len(x))]
    np.testing.assert_array_equal(rows.dense(), whole)
    np.testing.assert_array_equal(np.asarray(rows), whole)
    with pytest.raises(ValueError, match="holds no normalised array to share"):
        rows.__array__(copy=False)


@pytest.fixture
def raw_above(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The numpy backend keeps every set raw (as it does those above `DENSE_BYTES`)."""
    import fastnn.backends.numpy_backend as numpy_backend

    monkeypatch.setattr(numpy_backend, "DENSE_BYTES", 0)
    return numpy_backend


def test_numpy_keeps_a_large_set_raw_and_a_small_one_normalised(raw_above: Any) -> None:
    """Above `DENSE_BYTES` the fit keeps the caller's own array (no copy) and estimates no
    inputs but one evaluation block; below it, one normalised array."""
    from fastnn.backends import get_backend
    from fastnn.backends.base import Ops
    from fastnn.backends.normalised_rows import BLOCK_ROWS, NormalisedRows

    x = np.random.default_rng(2).integers(0, 256, (300, 12), np.uint8)
    config = Config(hidden=(6,), n_inputs=12, n_outputs=3, epochs=1)
    trainer = Trainer(config, keep_splits=True)
    trainer.fit(x, np.arange(300) % 3)
    inputs = trainer.splits[0].x
    assert isinstance(inputs, NormalisedRows) and inputs.raw is x
    parts = Trainer(config).run_memory([x]).parts
    assert parts["inputs normalised to float64"] == 0
    layers = Ops.evaluation_bytes(get_backend("numpy"), Plan.from_config(config), 300)
    assert parts["evaluation"] == layers + min(300, 2 * BLOCK_ROWS) * 12 * (8 + 8)
    raw_above.DENSE_BYTES = 300 * 12 * 8  # a copy of exactly this size is made
    trainer = Trainer(config, keep_splits=True)
    trainer.fit(x, np.arange(300) % 3)
    assert type(trainer.splits[0].x) is np.ndarray


@pytest.mark.parametrize("batch_norm", ["off", "bn"])
def test_a_blocked_evaluation_matches_the_whole_array(batch_norm: str) -> None:
    """loss_and_classes, forward_inference and the population statistics of a set of three
    blocks equal those of its whole normalised array to rounding (a block's product may take
    another BLAS kernel than the whole set's)."""
    from fastnn import Network
    from fastnn.backends import get_backend, steps
    from fastnn.backends.normalised_rows import BLOCK_ROWS, NormalisedRows

    ops = get_backend("numpy")
    gen = np.random.default_rng(8)
    x = gen.integers(0, 256, (3 * BLOCK_ROWS + 17, 20), np.uint8)
    normalizer = _normaliser(x, "min_max")
    config = Config(hidden=(9, 5), n_inputs=20, n_outputs=4, batch_norm=batch_norm,
                    dropout_input=0.8, dtype="float64")
    network = Network(config)
    plan, params = network.plan, network.numpy_params()
    t = np.eye(4)[gen.integers(0, 4, len(x))]
    rows = NormalisedRows(x, normalizer, "float64", None)
    whole = normalizer.transform_to(x, "float64")
    workspace = ops.workspace()
    lazy = ops.loss_and_classes(plan, params, {}, rows, t, workspace)
    dense = ops.loss_and_classes(plan, params, {}, whole, t, workspace)
    assert lazy[0] == pytest.approx(dense[0], rel=1e-13)
    assert int((lazy[1] != dense[1]).sum()) <= 1  # a near tie may flip
    statistics = steps.population_statistics(ops, plan, params, rows)
    expected = steps.population_statistics(ops, plan, params, whole)
    assert statistics.keys() == expected.keys()
    for k, (mean, var) in expected.items():
        np.testing.assert_allclose(statistics[k][0], mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(statistics[k][1], var, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        steps.forward_inference(ops, plan, params, expected, rows),
        steps.forward_inference(ops, plan, params, expected, whole), rtol=1e-12, atol=1e-15)


def test_a_fit_on_raw_rows_matches_the_fit_on_the_normalised_array(raw_above: Any) -> None:
    """Batches gathered from raw rows are the normalised array's (the same training); the
    evaluations' blocks agree to rounding."""
    from fastnn.backends.normalised_rows import BLOCK_ROWS

    gen = np.random.default_rng(4)
    x = gen.integers(0, 256, (2 * BLOCK_ROWS + 300, 16), np.uint8)
    labels = gen.integers(0, 3, len(x))
    config = Config(hidden=(8,), n_inputs=16, n_outputs=3, epochs=2, batch_size=500,
                    normalize="z_score", dropout_hidden=0.5)
    raw = Trainer(config).fit(x, labels, x[:900], labels[:900])
    raw_above.DENSE_BYTES = 2**40
    dense = Trainer(config).fit(x, labels, x[:900], labels[:900])
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose(getattr(raw, key), getattr(dense, key), rtol=1e-10)
    for key in ("train_acc", "test_acc"):
        assert np.abs(np.subtract(getattr(raw, key), getattr(dense, key))).max() <= 2 / 900


def test_numpy_raw_inputs_that_overflow_are_refused_before_training(raw_above: Any) -> None:
    """A set kept raw is normalised once when it is taken (nothing kept): an overflowing test
    row is a `DataError` naming it, before any epoch, as with the normalised copy."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(60, 3))
    x[:, 0] = -np.abs(x[:, 0]) * 1e307  # training range of column 0: about [-2e307, 0]
    x[0, 0] = -1e308
    x_test = x[:10].copy()
    x_test[3, 0] = 1.7e308  # 1.7e308 - (-1e308) overflows
    trainer = Trainer(Config(hidden=(4,), n_inputs=3, n_outputs=2, epochs=1,
                             normalize="min_max", normalize_axis=0))
    with pytest.raises(DataError, match=r"x_test: inputs too large to normalise .* row 3"):
        trainer.fit(x, np.arange(60) % 2, x_test, np.arange(10) % 2)
    assert trainer.history.epochs == 0
