"""A whole set evaluated on the kernels, layer by layer, with one read of the device.

The products run in row blocks; the article's whole-set batch statistics come from
``col_partial_sums``/``col_stats_finalize`` and the hidden layers are normalised with them
(``hidden_forward`` with given statistics); ``eval_output`` adds up the loss and writes the
predicted classes into one device buffer that is read once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda import COLUMN_BLOCK, GEMM_TILE, LINEAR_BLOCK
from ..codes import ACTIVATION_CODES, DROPOUT_CODES, OUTPUT_CODES, STATS_CODES
from ..workspace import Workspace
from .device import KernelBase
from .launches import GRID_Y_MAX, Launch, bn_code, cdiv, linear_grid

if TYPE_CHECKING:
    from ...plan import Plan

Array = Any

#: rows of one product launch in `KernelEvaluation.loss_and_classes` (workspace option "eval_block")
EVAL_BLOCK = 16384
#: rows per block row of the whole-set statistics and of the evaluation's hidden layers
STATS_ROWS, EVAL_ROWS = 512, 64


class KernelEvaluation(KernelBase):
    """`loss_and_classes` as kernel launches (the reference's when the kernels do not take the plan
    or its arrays)."""

    def loss_and_classes(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, workspace: Workspace,
    ) -> tuple[float, Any]:
        """(data loss, predicted classes) of a whole set: layer by layer over every row (the
        products in row blocks), whole-set statistics with the colstats kernels, the output
        through eval_output, one read of the device at the end; the launches captured as one
        graph where the device can (`KernelBase.program`)."""
        batch_stats = plan.bn_eval == "batch" or not running
        normalised = plan.batch_norm != "off"
        if not self._plan_fits(plan, params, running, x, t, normalised and not batch_stats):
            return super().loss_and_classes(plan, params, running, x, t, workspace)
        dtype, sizes, n_layers = np.dtype(plan.dtype), plan.sizes, plan.n_layers
        n, launch = len(x), self.launch
        block = max(1, min(int(workspace.options.get("eval_block", EVAL_BLOCK)),
                           GRID_Y_MAX * GEMM_TILE))
        scales = plan.eval_scales()

        def buffer(name: Any, shape: tuple[int, ...], kind: Any = dtype) -> Array:
            return self._buffer(workspace, ("evaluate", name), shape, kind)

        launches: list[Launch] = []
        z = x
        for k in range(1, n_layers + 1):
            d, d_in = sizes[k], sizes[k - 1]
            u = buffer(("u", k), (n, d))
            for start in range(0, n, block):
                rows = min(block, n - start)
                a = z[start : start + rows]
                if k == 1 and scales[0] != 1.0:  # the article's input scale at evaluation
                    scaled = buffer("x", (min(block, n), d_in))[:rows]
                    launches.append(launch(
                        "dropout_input", dtype, linear_grid(rows * d_in), LINEAR_BLOCK, x=a,
                        n=rows, d=d_in, drop=DROPOUT_CODES["article_eval"], key=0,
                        key_at=None, keep=scales[0], mask=None, out=scaled))
                    a = scaled
                launches.append(launch.gemm("nn", a, params[f"W{k}"], u[start : start + rows],
                                            params[f"b{k}"], rows, d, d_in))
            if k == n_layers:
                z = u
                break
            mean = var = None
            if normalised and batch_stats:  # the statistics of the whole set
                blocks = min(cdiv(n, STATS_ROWS), GRID_Y_MAX)
                partial = buffer(("partial", k), (blocks, d))
                mean, var, std = (buffer((name, k), (d,)) for name in ("mean", "var", "std"))
                grid = (cdiv(d, 32), blocks, 1)
                launches += [
                    launch("col_partial_sums", dtype, grid, COLUMN_BLOCK, u=u, n=n, d=d,
                           center=None, partial=partial),
                    launch("col_stats_finalize", dtype, linear_grid(d), LINEAR_BLOCK,
                           partial=partial, blocks=blocks, n=n, d=d, out=mean, std_dev=None),
                    launch("col_partial_sums", dtype, grid, COLUMN_BLOCK, u=u, n=n, d=d,
                           center=mean, partial=partial),
                    launch("col_stats_finalize", dtype, linear_grid(d), LINEAR_BLOCK,
                           partial=partial, blocks=blocks, n=n, d=d, out=var, std_dev=std),
                ]
            elif normalised:
                mean, var = running[k]
            spec, scale = plan.hidden[k - 1], scales[k]
            z = buffer(("z", k), (n, d))
            gamma = params.get(f"gamma{k}")
            launches.append(launch(
                "hidden_forward", dtype, (cdiv(d, 32), min(cdiv(n, EVAL_ROWS), GRID_Y_MAX), 1),
                COLUMN_BLOCK, u=u, n=n, d=d, act=ACTIVATION_CODES[spec.activation],
                alpha=spec.alpha, bn=bn_code(spec, gamma), gamma=gamma,
                beta=params.get(f"beta{k}"), stats=STATS_CODES["given"], mean=mean, var=var,
                std_dev=None, drop=DROPOUT_CODES["article_eval" if scale != 1.0 else "none"],
                key=0, key_at=None, keep_count=d, keep=scale, mask_out=None, y_out=None,
                u_hat_out=None, z=z))
        # loss sum (float64) and predicted classes (int32) share one buffer: one read back
        out = buffer("out", (8 + 4 * n,), np.uint8)
        loss_sum, predicted = out[:8].view(np.float64), out[8:].view(np.int32)
        c = sizes[-1]
        launches.append(launch(
            "eval_output", dtype, (cdiv(n, LINEAR_BLOCK[0]), 1, 1), LINEAR_BLOCK, u=z, t=t, n=n,
            c=c, output=OUTPUT_CODES[plan.output], labels=None, predicted=predicted,
            loss_sum=loss_sum, correct=None))
        # one graph per set size, kept while the same launches come back
        program = self.program(workspace, ("evaluate", n), launches,
                               self.capture_for(workspace))
        loss_sum.fill(0)  # eval_output adds the loss up into it
        program.launch()
        host = np.asarray(self.device.to_host(out))
        workspace.count("evaluate_kernels")
        loss = float(host[:8].view(np.float64)[0]) / n
        return float(dtype.type(loss)), host[8:].view(np.int32).astype(np.intp)
