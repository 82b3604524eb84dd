"""The normalisation a block of rows at a time: the same bits as the whole set in float64,
without a float64 copy of it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fastnn import Config, Trainer
from fastnn import preprocessing as pre
from fastnn.errors import DataError
from fastnn.preprocessing import Normalizer, as_inputs, column_moments

DTYPES = [np.uint8, np.int64, np.float32, np.float64]
#: rows per block of a set of 37 columns
BLOCK = pre.CHUNK_VALUES // 37


def _inputs(dtype: type, rows: int = 20_000, columns: int = 784) -> np.ndarray:
    generator = np.random.default_rng(3)
    values = generator.random((rows, columns)) * 255 * (generator.random((rows, columns)) < 0.3)
    return values.astype(dtype)


@pytest.mark.parametrize("layout", ["rows", "columns", "one column", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_moments_are_numpys_float64_mean_and_std_bit_for_bit(dtype: type,
                                                                    layout: str) -> None:
    """Row-major arrays are summed row after row, column-major ones (pandas' values) column
    by column, pairwise: each as NumPy sums the float64 copy the old code made."""
    x = _inputs(dtype, rows=3 * BLOCK + 17, columns=37)  # several blocks, a short one
    x = {"rows": x, "columns": np.asfortranarray(x), "one column": x[:, 3:4],
         "strided": np.asfortranarray(x)[:, ::3]}[layout]
    whole = x.astype(np.float64)
    mean, std = column_moments(x)
    np.testing.assert_array_equal(mean, whole.mean(axis=0))
    np.testing.assert_array_equal(std, whole.std(axis=0))


@pytest.mark.parametrize("method, axis", [("standard", None), ("min_max", None),
                                          ("min_max", 0), ("z_score", None), ("z_score", 0)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_fit_and_transform_to_equal_the_whole_set_in_float64(method: str, axis: int | None,
                                                             dtype: type) -> None:
    x = _inputs(dtype, rows=pre.CHUNK_VALUES // 50 + 100, columns=50)
    x[:, 4] = 9  # a constant column
    chunked = Normalizer(method, axis).fit(x)
    whole = Normalizer(method, axis).fit(x.astype(np.float64))
    np.testing.assert_array_equal(chunked.shift, whole.shift)
    np.testing.assert_array_equal(chunked.scale, whole.scale)
    for out_dtype in ("float32", "float64"):
        got = chunked.transform_to(x, out_dtype, "x")
        assert got.dtype == np.dtype(out_dtype) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, whole.transform(x.astype(np.float64)).astype(out_dtype))


def test_a_normalizer_axis_other_than_all_or_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="axis must be None .* or 0"):
        Normalizer("min_max", 1).fit(np.ones((3, 2)))


def test_as_inputs_keeps_the_callers_array_and_checks_every_block() -> None:
    x = _inputs(np.uint8, rows=100, columns=784)
    assert as_inputs(x, 784, "x") is x
    images = x.reshape(100, 28, 28)
    flat = as_inputs(images, 784, "x")
    assert flat.shape == (100, 784) and np.shares_memory(flat, images)
    rows = pre.CHUNK_VALUES // 37
    floats = _inputs(np.float32, rows=2 * rows + 5, columns=37)
    floats[2 * rows + 2, 1] = np.nan  # in the last, short block
    with pytest.raises(DataError, match=rf"x: 1 value is NaN or infinite \(first at row "
                                        rf"{2 * rows + 2}\)"):
        as_inputs(floats, 37, "x")


def test_an_overflow_names_its_row_across_blocks() -> None:
    norm = Normalizer("min_max", 0).fit(np.array([[-1e308], [0.0]]))
    x = np.zeros((pre.CHUNK_VALUES + 10, 1))
    x[pre.CHUNK_VALUES + 3, 0] = 1.7e308  # 1.7e308 + 1e308 overflows
    with pytest.raises(DataError, match=f"row {pre.CHUNK_VALUES + 3} overflows"):
        norm.transform_to(x, "float32", "x_test")


def test_preparing_uint8_inputs_makes_no_float64_copy_of_them() -> None:
    """The trainer's split of 20,000 x 784 uint8 rows costs one float32 copy (63 MB) and a
    block's temporaries, not the float64 copies (125 MB each) it took before; tracemalloc
    sees NumPy's allocations."""
    x = _inputs(np.uint8)
    labels = np.arange(len(x)) % 10
    trainer = Trainer(Config(epochs=0, backend="numpy", dtype="float32"))
    tracemalloc.start()
    try:
        train, _, _ = trainer.prepare(x, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_copy = x.size * 4
    assert train.x.dtype == np.float32 and train.x.shape == x.shape
    assert one_copy <= peak < one_copy + 8 * pre.CHUNK_VALUES * 4  # blocks, not the set
    expected = ((x.astype(np.float64) - x.min()) / (x.max() - x.min())).astype(np.float32)
    np.testing.assert_array_equal(train.x, expected)
