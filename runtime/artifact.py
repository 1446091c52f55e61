"""One device's artifact: its compiled library and weights, ready to run its pieces.

Board-side code: imports numpy and the TVM runtime only (with ``TVM_USE_RUNTIME_LIB=1`` the
TVM package loads without its compiler).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fpga import KIND as FPGA_KIND
from .fpga import FpgaPieces
from .plan import Device, Piece, Plan, PlanError, sha256_file
from .wire import ALIGNMENT


class TvmPieces:
    """A device's pieces in a TVM library (``Device.kind == "tvm"``), with their weights."""

    exact = True  # the split's answers are the model's up to float rounding

    def __init__(self, folder: Path, device: Device, pieces: dict[str, Piece], **_options):
        import tvm  # runtime only: with TVM_USE_RUNTIME_LIB=1 no compiler is loaded
        import tvm.runtime.vm  # not imported by `import tvm` under TVM_USE_RUNTIME_LIB=1

        self._tensor = tvm.runtime.tensor
        self._from_dlpack = tvm.runtime.from_dlpack
        self._funcs = {}
        try:
            if pieces:
                lib = tvm.runtime.load_module(str(folder / device.lib))
                vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
                self._funcs = {n: vm[n] for n in pieces}
            with np.load(folder / device.weights) as stored:
                self._weights = {
                    p.name: [self._tensor(stored[f"{p.name}/{i}"])
                             for i in range(p.num_weights)]
                    for p in pieces.values()}
        except Exception as e:  # a file that passed its hash but does not load
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PlanError(f"{device.name}: cannot load its compiled pieces from {folder}: "
                            f"{type(e).__name__}: {first}") from None

    def _arg(self, x: np.ndarray):
        """An input as a TVM tensor: the array itself where TVM can take it (C-contiguous,
        writable, 64-byte aligned, as the worker's receive buffers are: a copy cost 15 us a
        tensor, most of a small piece's time), else a copy."""
        if x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % ALIGNMENT == 0:
            try:
                return self._from_dlpack(x)
            except Exception:  # (a dtype DLPack does not carry): copied below
                pass
        return self._tensor(np.require(x, requirements="C"))  # 0-d stays 0-d

    def run(self, piece: Piece, inputs: list[np.ndarray], plan: Plan) -> list[np.ndarray]:
        args = [self._arg(x) for x in inputs]
        args += self._weights[piece.name]
        out = self._funcs[piece.name](*args)
        outs = [out] if len(piece.outputs) == 1 else [out[i] for i in range(len(piece.outputs))]
        return [self._out(o, inputs) for o in outs]

    @staticmethod
    def _out(tensor, inputs: list[np.ndarray]) -> np.ndarray:
        """An output as numpy without a copy (TVM's memory, aligned: the next piece takes it
        as it is), unless it is an input handed back (a buffer the worker reuses)."""
        try:
            arr = np.from_dlpack(tensor)
        except Exception:  # (a dtype numpy does not take through DLPack)
            return tensor.numpy()
        if any(np.may_share_memory(arr, x) for x in inputs):
            return arr.copy()
        return arr


class _FpgaDevice:
    """A device's FPGA pieces (``Device.kind == "hls4ml"``): see :mod:`.fpga`."""

    exact = FpgaPieces.exact

    def __init__(self, folder: Path, device: Device, pieces: dict[str, Piece], *,
                 fpga_mode: str, verify: bool):
        self.pieces = FpgaPieces(folder, fpga_mode, verify=verify)

    def run(self, piece: Piece, inputs: list[np.ndarray], plan: Plan) -> list[np.ndarray]:
        return [self.pieces.run(piece.name, inputs[0], plan.tensors[piece.outputs[0]].shape)]


#: How each kind of device (``Device.kind`` in the plan) loads and runs its pieces.
#: Each class's ``exact`` says whether it gives the model's answer up to float rounding (a
#: TVM library) or only close to it (fixed point on an FPGA).
KINDS = {"tvm": TvmPieces, FPGA_KIND: _FpgaDevice}


class DeviceArtifact:
    """The pieces of one device, loaded once and run many times.

    Parameters
    ----------
    folder : path
        ``OUT/<device>``: ``plan.json``, the library and the weights file named there.
    verify : bool
        Check the library's and weights' SHA-256 against the plan before loading. A plan that
        gives no hash for a file it needs is refused (a library is code this process will
        run: it is never loaded unchecked); ``verify=False`` skips both, for tests only.
    fpga_mode : str
        For a device of kind ``hls4ml`` (an FPGA target): ``emulation`` (the bit-accurate C
        simulation) or ``board`` (the PYNQ overlay); see :mod:`.fpga`.
    plan_file : path, optional
        The plan to load the device's pieces of (default ``folder/plan.json``): a fallback
        plan the folder holds (:mod:`.fallback`), whose files lie in ``folder`` too.
    """

    def __init__(self, folder: str | Path, *, verify: bool = True,
                 fpga_mode: str = "emulation", plan_file: str | Path | None = None):
        self.folder = Path(folder)
        self.plan = Plan.load(self.folder if plan_file is None else plan_file)
        name = self.folder.name
        self.device = self.plan.device(name)
        self.pieces = {p.name: p for p in self.plan.pieces_on(name)}
        if self.device.kind not in KINDS:
            raise PlanError(f"device {name} is of kind {self.device.kind!r}; this runtime "
                            f"loads {', '.join(KINDS)}")
        lib_path, weights_path = self.folder / self.device.lib, self.folder / self.device.weights
        files = [(weights_path, self.device.weights_sha256)]
        if self.pieces:  # a device the split left idle has no library
            files.append((lib_path, self.device.lib_sha256))
        for path, digest in files:
            if not path.exists():
                raise PlanError(f"{path} is missing: the artifact folder is incomplete")
            if verify and not digest:
                raise PlanError(f"the plan gives no SHA-256 for {path.name} of {name}: a board "
                                "loads nothing unchecked; compile again (`splitc compile` "
                                "writes the hashes)")
            if verify and sha256_file(path) != digest:
                raise PlanError(f"{path} does not match the plan's hash: it comes from another "
                                "compile; copy this device's folder again")
        self._impl = KINDS[self.device.kind](self.folder, self.device, self.pieces,
                                             fpga_mode=fpga_mode, verify=verify)

    @property
    def fpga(self) -> FpgaPieces | None:
        """The FPGA pieces, for a device of kind ``hls4ml``."""
        return getattr(self._impl, "pieces", None) if self.device.kind == FPGA_KIND else None

    def run(self, piece: str | Piece, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one piece on its input arrays; returns its outputs in the plan's order."""
        p = self.pieces[piece if isinstance(piece, str) else piece.name]
        if len(inputs) != len(p.inputs):
            raise PlanError(f"piece {p.name} takes {len(p.inputs)} inputs, got {len(inputs)}")
        return self._impl.run(p, inputs, self.plan)
