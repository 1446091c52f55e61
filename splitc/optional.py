"""Optional heavy dependencies, loaded on first use and from here only (so that `splitc --help`,
a plain compile or a board never pays for what it does not use, and a missing package is named
in one clear error).

Each function returns the module; a package that is not installed raises :class:`SplitcError`
naming it and what needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from splitc.errors import SplitcError


def _load(name: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SplitcError(f"{purpose} needs the Python package {name.split('.')[0]!r}, which "
                          f"does not import here ({e}); install splitc[compiler]") from None


def hls4ml() -> ModuleType:
    """hls4ml: FPGA pieces become HLS projects (slow to import)."""
    return _load("hls4ml", "an FPGA target")


def onnxruntime() -> ModuleType:
    """ONNX Runtime: the reference an ONNX model's split is checked against."""
    return _load("onnxruntime", "running an ONNX model as the reference")


def scipy_sparse() -> ModuleType:
    """scipy.sparse: the branch partition's affinity matrix."""
    return _load("scipy.sparse", "the branch strategy")


def cairosvg() -> ModuleType:
    """cairosvg: PNG output of drawings."""
    return _load("cairosvg", "drawing to PNG")
