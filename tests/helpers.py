"""Shared test helpers: build and run a Relax module on this CPU."""

import numpy as np
import tvm
from tvm import relax

HOST = tvm.target.Target({"kind": "llvm"})


def run_module(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    """Compile ``mod`` for the host and return ``main``'s (first) output as numpy."""
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def run_built(mod: tvm.IRModule, *inputs: np.ndarray, schedules: bool = True) -> np.ndarray:
    """Like :func:`run_module`, through :func:`splitc.backend.build.build` (packing and
    schedules)."""
    from splitc.backend.build import build

    ex, _ = build(mod, HOST, schedules=schedules)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def one_per_row(rows, choices, default_rows=None) -> list:
    """The cross product ``rows`` x ``choices`` as pytest params (each row's values, then the
    choice), where one choice per row is in the default run — in turn along the rows, so
    every choice is still covered — and the rest are marked ``slow`` (``-m slow``).
    ``default_rows``: only these rows have a choice in the default run (the turn goes along
    them); the others are all ``slow``."""
    import pytest

    params, turn = [], 0
    for row in rows:
        default = default_rows is None or row in default_rows
        for j, choice in enumerate(choices):
            params.append(pytest.param(
                *(row if isinstance(row, tuple) else (row,)), choice,
                marks=() if default and j == turn % len(choices) else (pytest.mark.slow,)))
        turn += default
    return params
