"""Pieces that run on an FPGA: the hls4ml projects ``splitc compile`` wrote for an FPGA target.

Board-side code: imports numpy and ctypes (and ``pynq`` in board mode) only.

A device folder for an FPGA target holds ``fpga.json`` (the manifest: each piece's HLS
project, its C-simulation library, symbol and sizes, the layouts of its input and output,
and the compile's resource estimate) next to ``weights.npz`` and ``plan.json``. hls4ml holds
feature maps channels last: a piece reads and writes flat ``H x W x C`` vectors, and
:meth:`FpgaPieces.run` transposes the plan's NCHW tensors into them and back, as the
manifest's layouts say. Two modes:

* ``emulation`` (default; what tests and CI use): each piece runs in hls4ml's bit-accurate C
  simulation of the generated HLS code, compiled with g++ at ``splitc compile`` time
  (``<piece>.so``, called through ctypes), reading its weights from ``<piece>.weights/`` next
  to it (so the folder runs wherever it is copied). Same fixed-point arithmetic as the
  hardware; not its speed.
* ``board`` (on the PYNQ board, after building the bitstream with the vendor tools — see the
  project's ``BUILD.md``): each piece's overlay (``<piece>.bit`` + ``<piece>.hwh`` next to the
  manifest) is loaded with the ``pynq`` package and fed through its AXI DMA, as hls4ml's
  ``axi_stream_driver.py`` does. Not runnable here (no board).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np

from .plan import PlanError, sha256_file

MANIFEST = "fpga.json"
#: the manifest's format; 2 added each piece's input and output layout (1: flat vectors)
FORMAT = "splitc-fpga/2"
FORMATS = ("splitc-fpga/1", FORMAT)
#: the plan's name for devices whose pieces these are (``Device.kind``)
KIND = "hls4ml"
MODES = ("emulation", "board")


class Layout:
    """How the plan's tensor (NCHW) lies in a piece's flat vector (channels last): the
    manifest's ``{"stored": [...], "order": [...]}``, ``stored = tensor.reshape(view)
    .transpose(order)`` (see ``splitc.backend.hls_graph.Layout``). Missing: flat, as is."""

    def __init__(self, entry: dict | None, size: int):
        if entry is None:
            entry = {"stored": [size], "order": [0]}
        self.stored = tuple(int(d) for d in entry["stored"])
        self.order = tuple(int(a) for a in entry["order"])
        if sorted(self.order) != list(range(len(self.stored))) or \
                int(np.prod(self.stored)) != size:
            raise PlanError(f"{MANIFEST}: layout {entry} does not describe {size} values")
        self.inverse = tuple(int(a) for a in np.argsort(self.order))
        self.view = tuple(self.stored[a] for a in self.inverse)

    def to_fabric(self, x: np.ndarray) -> np.ndarray:
        """The plan's tensor -> the flat channels-last vector the piece reads."""
        return np.ascontiguousarray(x.reshape(self.view).transpose(self.order),
                                    dtype=np.float32).reshape(-1)

    def from_fabric(self, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The piece's flat vector -> the plan's tensor of ``shape``."""
        return np.ascontiguousarray(y.reshape(self.stored).transpose(self.inverse)).reshape(
            shape)


def weights_digest(folder: Path) -> str:
    """One SHA-256 over a C simulation's weights folder (its files' names and contents)."""
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)};" for p in
                                  sorted(folder.iterdir())).encode()).hexdigest()


class FpgaPieces:
    """The FPGA pieces of one device folder, ready to run (see the module docstring)."""

    #: fixed point: answers agree with float in their top-1, not to the last bits
    exact = False

    def __init__(self, folder: str | Path, mode: str = "emulation", *, verify: bool = True):
        if mode not in MODES:
            raise PlanError(f"FPGA mode {mode!r}: choose {' or '.join(MODES)}")
        self.folder, self.mode = Path(folder), mode
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest.get("format") not in FORMATS:
            raise PlanError(f"{self.folder / MANIFEST} is in format "
                            f"{self.manifest.get('format')!r}; this runtime reads "
                            f"{', '.join(FORMATS)}: compile again")
        self._run = {}
        self._layouts = {name: (Layout(p.get("input"), p["in_size"]),
                                Layout(p.get("output"), p["out_size"]))
                         for name, p in self.manifest["pieces"].items()}
        for name, p in self.manifest["pieces"].items():
            if mode == "emulation":
                self._run[name] = self._emulated(name, p, verify)
            else:
                self._run[name] = self._overlay(name, p)

    def _emulated(self, name: str, p: dict, verify: bool):
        path = self.folder / p["emulation"]
        if not path.exists():
            raise PlanError(f"{path} is missing: the FPGA artifact folder is incomplete")
        if verify and sha256_file(path) != p["sha256"]:
            raise PlanError(f"{path} does not match its hash in {MANIFEST}: copy the folder "
                            "again")
        lib = ctypes.CDLL(str(path.resolve()))
        if "weights_dir" in p:  # (format 1 read them from the compile's own path)
            weights = self.folder / p["weights_dir"]
            if not weights.is_dir():
                raise PlanError(f"{weights} is missing: the FPGA artifact folder is incomplete")
            if verify and weights_digest(weights) != p["weights_sha256"]:
                raise PlanError(f"{weights} does not match its hash in {MANIFEST}: copy the "
                                "folder again")
            setter = getattr(lib, p["weights_setter"])
            setter.argtypes, setter.restype = [ctypes.c_char_p], None
            setter(str(weights.resolve()).encode())
        fn = getattr(lib, p["symbol"])
        fn.restype = None
        fn.argtypes = [ctypes.POINTER(ctypes.c_float)] * 2
        n_in, n_out = p["in_size"], p["out_size"]

        def run(x: np.ndarray) -> np.ndarray:
            x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
            if x.size != n_in:
                raise PlanError(f"FPGA piece {name} takes {n_in} values, got {x.size}")
            y = np.empty(n_out, np.float32)
            fn(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
               y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            return y
        return run

    def _overlay(self, name: str, p: dict):
        try:
            from pynq import Overlay, allocate  # only on a PYNQ board image
        except ImportError:
            raise PlanError("FPGA board mode needs the pynq package (the PYNQ board image); "
                            "run with --fpga emulation elsewhere") from None
        bit = self.folder / f"{name}.bit"
        if not bit.exists():
            raise PlanError(f"{bit} is missing: build the bitstream with the vendor tools (see "
                            f"{self.folder / p['project'] / 'BUILD.md'}) and copy the .bit and "
                            ".hwh next to fpga.json")
        overlay = Overlay(str(bit))
        dma = overlay.hier_0.axi_dma_0
        inbuf = allocate(shape=(p["in_size"],), dtype=np.float32)
        outbuf = allocate(shape=(p["out_size"],), dtype=np.float32)

        def run(x: np.ndarray) -> np.ndarray:
            inbuf[:] = np.asarray(x, np.float32).reshape(-1)
            dma.sendchannel.transfer(inbuf)
            dma.recvchannel.transfer(outbuf)
            dma.sendchannel.wait()
            dma.recvchannel.wait()
            return np.array(outbuf)
        return run

    def run(self, piece: str, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        """One inference of ``piece`` on the plan's tensor ``x`` (NCHW, or a vector); its
        output as the plan's tensor of ``out_shape``. The fabric holds maps channels last:
        the manifest's layouts say how to get there and back."""
        into, back = self._layouts[piece]
        x = np.asarray(x, dtype=np.float32)
        if x.size != int(np.prod(into.stored)):
            raise PlanError(f"FPGA piece {piece} takes {int(np.prod(into.stored))} values, "
                            f"got {x.size}")
        return back.from_fabric(self._run[piece](into.to_fabric(x)), tuple(out_shape))
