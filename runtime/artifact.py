"""One device's artifact: its compiled library and weights, ready to run its pieces.

Board-side code: imports numpy and the TVM runtime only (with ``TVM_USE_RUNTIME_LIB=1`` the
TVM package loads without its compiler).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fpga import MANIFEST as FPGA_MANIFEST
from .fpga import FpgaPieces
from .plan import Piece, Plan, PlanError, sha256_file


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
        For a device of an FPGA target (its "library" is ``fpga.json``): ``emulation`` (the
        bit-accurate C simulation) or ``board`` (the PYNQ overlay); see :mod:`.fpga`.
    """

    def __init__(self, folder: str | Path, *, verify: bool = True,
                 fpga_mode: str = "emulation"):
        self.folder = Path(folder)
        self.plan = Plan.load(self.folder)
        name = self.folder.name
        self.device = self.plan.device(name)
        self.pieces = {p.name: p for p in self.plan.pieces_on(name)}
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
        self.fpga = None
        if self.device.lib == FPGA_MANIFEST:  # hls4ml pieces: no TVM on this device
            self.fpga = FpgaPieces(self.folder, fpga_mode, verify=verify)
            return
        import tvm  # runtime only: with TVM_USE_RUNTIME_LIB=1 no compiler is loaded
        import tvm.runtime.vm  # not imported by `import tvm` under TVM_USE_RUNTIME_LIB=1

        self._tensor = tvm.runtime.tensor
        self._funcs = {}
        try:
            if self.pieces:
                lib = tvm.runtime.load_module(str(lib_path))
                vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
                self._funcs = {n: vm[n] for n in self.pieces}
            with np.load(weights_path) as stored:
                self._weights = {
                    p.name: [self._tensor(stored[f"{p.name}/{i}"])
                             for i in range(p.num_weights)]
                    for p in self.pieces.values()}
        except Exception as e:  # a file that passed its hash but does not load
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PlanError(f"{name}: cannot load its compiled pieces from {self.folder}: "
                            f"{type(e).__name__}: {first}") from None

    def run(self, piece: str | Piece, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one piece on its input arrays; returns its outputs in the plan's order."""
        p = self.pieces[piece if isinstance(piece, str) else piece.name]
        if len(inputs) != len(p.inputs):
            raise PlanError(f"piece {p.name} takes {len(p.inputs)} inputs, got {len(inputs)}")
        if self.fpga is not None:
            return [self.fpga.run(p.name, inputs[0], self.plan.tensors[p.outputs[0]].shape)]
        args = [self._tensor(np.require(x, requirements="C")) for x in inputs]  # 0-d stays 0-d
        args += self._weights[p.name]
        out = self._funcs[p.name](*args)
        if len(p.outputs) == 1:
            return [out.numpy()]
        return [out[i].numpy() for i in range(len(p.outputs))]
