"""Training and calibration data a user gives: ``.npz`` / ``.npy`` files, a folder of them, or a
``module:function`` returning a torch Dataset."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import tvm

from splitc.errors import SplitcError


def load_data(spec: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Training data: a ``.npz`` (arrays ``x`` and optionally ``y``), a folder of them (or of
    ``.npy`` inputs), or ``module:function`` returning a torch Dataset of ``x`` or ``(x, y)``."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted([*path.glob("*.npz"), *path.glob("*.npy")])
        if not files:
            raise SplitcError(f"{path} holds no .npz or .npy files")
        parts = [load_data(f) for f in files]
        xs = np.concatenate([p[0] for p in parts])
        ys = [p[1] for p in parts]
        return xs, (np.concatenate(ys) if all(y is not None for y in ys) else None)
    if path.suffix == ".npy" and path.exists():
        return np.load(path, allow_pickle=False), None
    if path.suffix == ".npz" and path.exists():
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d:
                raise SplitcError(f"{path} has no array named x (has: {', '.join(d.files)})")
            return d["x"], (d["y"] if "y" in d else None)
    if ":" in spec and not path.exists():
        module, _, fn = spec.partition(":")
        try:
            dataset = getattr(importlib.import_module(module), fn)()
        except (ImportError, AttributeError) as e:
            raise SplitcError(f"cannot load the dataset factory {spec}: {e}") from None
        items = [dataset[i] for i in range(len(dataset))]
        if isinstance(items[0], tuple | list):
            return (np.stack([np.asarray(i[0]) for i in items]),
                    np.asarray([int(i[1]) for i in items]))
        return np.stack([np.asarray(i) for i in items]), None
    raise SplitcError(f"training data {spec} not found: give a .npz with x (and y), a folder "
                      "of .npz/.npy files, or module:function returning a torch Dataset")


def check_examples(mod: tvm.IRModule, x: np.ndarray, y: np.ndarray | None) -> None:
    """Training or calibration examples must fit the model's (first) input."""
    want = tuple(int(d) for d in mod["main"].params[0].ty.shape.values)
    if tuple(x.shape[1:]) != want[1:]:
        raise SplitcError(f"training inputs have shape {list(x.shape[1:])} per example, the "
                          f"model takes {list(want[1:])}")
    if y is not None and len(y) != len(x):
        raise SplitcError(f"{len(x)} inputs but {len(y)} labels")
