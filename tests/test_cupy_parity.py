"""The CuPy backend against the NumPy reference (skipped without CuPy and a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import small_batch, small_config

from fastnn import Network, Trainer, backends

REASON = backends.available()["cupy"]
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cupy backend: {REASON}")

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_norm", ["off", "n", "bn", "node"])
@pytest.mark.parametrize("mode", ["article", "inverted"])
def test_loss_and_grads_match_numpy(dtype: str, batch_norm: str, mode: str) -> None:
    changes = dict(
        dtype=dtype,
        batch_norm=batch_norm,
        dropout_input=0.8,
        dropout_hidden=0.5,
        dropout_mode=mode,
        weight_decay=("l2", 0.01),
    )
    ref, gpu = Network(small_config(**changes)), Network(small_config(backend="cupy", **changes))
    x, t = small_batch(n=9)
    masks = {k: ref.ops.to_numpy(ref.dropout_masks(1, 0, 9)[k]) for k in (0, 1, 2)}
    for k, mask in masks.items():  # the counter-based masks are identical on the GPU
        np.testing.assert_array_equal(gpu.ops.to_numpy(gpu.dropout_masks(1, 0, 9)[k]), mask)
    loss, grads = ref.loss_and_grads(x, t, masks)
    gpu_loss, gpu_grads = gpu.loss_and_grads(x, t, masks)
    assert gpu_loss == pytest.approx(loss, rel=TOLERANCE[dtype])
    for name, grad in grads.items():
        np.testing.assert_allclose(
            gpu.ops.to_numpy(gpu_grads[name]),
            grad,
            rtol=TOLERANCE[dtype],
            atol=TOLERANCE[dtype],
            err_msg=name,
        )


def test_whole_run_matches_numpy() -> None:
    from conftest import make_blobs

    x, t = make_blobs(500, 20, 3, seed=2)
    config = small_config(n_inputs=20, epochs=3, batch_size=32, batch_norm="bn", dropout_hidden=0.7)
    ref = Trainer(config).fit(x[:400], t[:400], x[400:], t[400:])
    gpu = Trainer(config.replace(backend="cupy")).fit(x[:400], t[:400], x[400:], t[400:])
    np.testing.assert_allclose(gpu.test_loss, ref.test_loss, rtol=1e-9)
    assert gpu.test_acc == ref.test_acc
