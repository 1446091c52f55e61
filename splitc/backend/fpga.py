"""FPGA pieces: a piece assigned to an FPGA target becomes an hls4ml project.

TVM's VTA is gone upstream (see ``../shared/FPGA_NOTES.md``); splitc's FPGA path is hls4ml,
reached beside TVM: the piece's Relax function (dense layers with biases and activations) is
rebuilt as a torch ``nn.Sequential`` with the piece's weights and handed to hls4ml's PyTorch
front end with a fixed-point precision and a reuse factor. hls4ml writes the HLS C++ project
for the part (``VivadoAccelerator`` backend: the HLS sources, the Vivado block design with an
AXI DMA, build scripts and the PYNQ overlay driver) and compiles its bit-accurate C simulation
with g++. The device folder gets::

    OUT/<device>/fpga.json          the manifest the worker reads (:mod:`splitc.runtime.fpga`)
    OUT/<device>/<piece>.so         the C simulation, what the worker runs in emulation
    OUT/<device>/hls/<piece>/       the project a user takes to the vendor tools (BUILD.md)

Before anything is generated, each piece gets a resource and latency **estimate** (multipliers
against DSP slices, weight bits against block RAM, cycles at the fabric clock, DMA bytes over
the AXI port); a piece that does not fit the part is refused with the numbers. After the
compile, :func:`check_precision` runs the emulated pieces inside the float model on
calibration data and refuses a precision whose top-1 agreement falls below a threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from splitc import optional
from splitc.backend.torch_program import TorchProgram
from splitc.errors import SplitcError
from splitc.passes.ir import main_block, op_name, static_shape
from splitc.runtime.fpga import KIND, MANIFEST, FpgaPieces
from splitc.runtime.plan import Device, Plan, sha256_file

#: Activations hls4ml's PyTorch front end takes, by Relax op.
ACTIVATIONS = {"nn.relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh"}


@dataclass(frozen=True)
class FpgaOptions:
    """How FPGA pieces are generated and checked."""

    precision: str = "ap_fixed<16,6>"
    reuse: int | None = None          # None: the smallest that fits the DSP slices
    min_agreement: float = 0.99       # top-1 agreement with float on calibration data

    def bits(self) -> tuple[int, int]:
        """(total bits, integer bits) of the fixed-point type."""
        m = re.fullmatch(r"ap_(?:u?fixed)<\s*(\d+)\s*,\s*(-?\d+)\s*(?:,[^>]*)?>",
                         self.precision)
        if not m:
            raise SplitcError(f"--fpga-precision {self.precision!r}: give an hls4ml fixed-point "
                              "type such as ap_fixed<16,6> (total bits, integer bits)")
        return int(m.group(1)), int(m.group(2))

    def width(self) -> int:
        return self.bits()[0]

    def wider(self) -> str:
        total, integer = self.bits()
        return f"ap_fixed<{total + 8},{integer + 2}>"


@dataclass
class Estimate:
    """What a piece needs on the fabric. Estimates, not synthesis results."""

    layers: list[dict]          # n_in, n_out, reuse, multipliers per dense layer
    multipliers: int
    dsp: int
    bram36: int
    cycles: int
    latency_s: float
    dsp_available: int
    bram36_available: int

    @property
    def fits(self) -> bool:
        return self.dsp <= self.dsp_available and self.bram36 <= self.bram36_available


def piece_layers(func: relax.Function, weights: list[np.ndarray], piece: str):
    """The dense layers and activations of an FPGA piece, from its Relax function: a list of
    ``("dense", W [in, out], b [out])`` and ``("act", torch module name)``."""
    n_inputs = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 1
    if n_inputs != 1:
        raise SplitcError(f"FPGA piece {piece} reads {n_inputs} tensors; the hls4ml path "
                          "takes one input: keep this part on a CPU device")
    params = {p.name: w for p, w in zip(func.params[n_inputs:], weights, strict=True)}
    layers: list[tuple] = []
    for b in main_block(tvm.IRModule({"main": func})).bindings:
        call, name = b.value, op_name(b.value)
        args = [a.name if isinstance(a, relax.Var) else None for a in call.args] \
            if isinstance(call, relax.Call) else []
        if name == "matmul" and args[1] in params and params[args[1]].ndim == 2:
            w = params[args[1]]
            layers.append(["dense", w, np.zeros(w.shape[1], w.dtype)])
        elif name == "add" and layers and layers[-1][0] == "dense" and \
                any(a in params and params[a].shape == layers[-1][2].shape for a in args):
            layers[-1][2] = layers[-1][2] + next(params[a] for a in args if a in params)
        elif name in ACTIVATIONS:
            layers.append(["act", ACTIVATIONS[name]])
        elif name in ("reshape", "flatten") and not layers and len(static_shape(b.var)) == 2:
            continue  # flattening the input: the FPGA piece takes a flat vector anyway
        else:
            raise SplitcError(
                f"FPGA piece {piece}: the hls4ml path takes dense layers (matmul + bias) and "
                f"{', '.join(sorted(ACTIVATIONS))}; {name} ({b.var.name}) is not one: keep "
                "that part of the model on a CPU device")
    if not any(kind == "dense" for kind, *_ in layers):
        raise SplitcError(f"FPGA piece {piece} has no dense layer to put on the fabric")
    return layers


def estimate(layers, spec, opts: FpgaOptions, reuse: list[int] | None = None) -> Estimate:
    """Resources and latency of ``layers`` on ``spec``'s fabric (see the module docstring).

    Per dense layer: ceil(n_in * n_out / reuse) multipliers (one DSP slice each from 10 bits
    up, two above 18: a DSP48 multiplies 25x18), weight bits in 36 Kb block RAMs, and
    reuse + log2(n_in) + 4 cycles (one result per reuse cycles, an adder tree, I/O registers).
    The call adds the DMA of inputs and outputs over the AXI port and a fixed overhead."""
    fab = spec.fpga
    width = opts.width()
    dense = [(w.shape[0], w.shape[1]) for kind, *rest in layers if kind == "dense"
             for w in [rest[0]]]
    reuse = reuse or [opts.reuse or 1] * len(dense)
    rows, mults, bits, cycles = [], 0, 0, 0
    for (n_in, n_out), r in zip(dense, reuse, strict=True):
        m = math.ceil(n_in * n_out / r)
        rows.append({"n_in": n_in, "n_out": n_out, "reuse": r, "multipliers": m})
        mults += m
        bits += n_in * n_out * width
        cycles += r + math.ceil(math.log2(max(2, n_in))) + 4
    per_mult = 0 if width < 10 else (1 if width <= 18 else 2)
    dma = (dense[0][0] + dense[-1][1]) * 4 / (spec.memory_bandwidth_gbs * 1e9)
    latency = cycles / (fab["clock_mhz"] * 1e6) + dma + fab.get("call_overhead_s", 0.0)
    return Estimate(rows, mults, mults * per_mult, math.ceil(bits / 36864), cycles, latency,
                    fab["dsp"], fab["bram36"])


def fitting_reuse(layers, spec, opts: FpgaOptions) -> int:
    """The smallest model-wide reuse factor whose multipliers fit the DSP slices."""
    if opts.reuse:
        return opts.reuse
    total = sum(w.shape[0] * w.shape[1] for kind, *rest in layers if kind == "dense"
                for w in [rest[0]])
    return max(1, math.ceil(total / spec.fpga["dsp"]))


def to_torch(layers):
    mods = []
    for kind, *rest in layers:
        if kind == "dense":
            w, b = rest
            lin = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                lin.bias.copy_(torch.from_numpy(np.asarray(b)))
            mods.append(lin)
        else:
            mods.append(getattr(torch.nn, rest[0])())
    return torch.nn.Sequential(*mods).eval()


def build_piece(piece: str, layers, spec, opts: FpgaOptions, folder: Path,
                log: Callable[[str], None]) -> dict:
    """Generate and compile one piece's hls4ml project; returns its manifest entry."""
    hls4ml = optional.hls4ml()

    model = to_torch(layers)
    n_in = next(rest[0].shape[0] for kind, *rest in layers if kind == "dense")
    n_out = next(rest[0].shape[1] for kind, *rest in reversed(layers) if kind == "dense")
    reuse = fitting_reuse(layers, spec, opts)
    project = folder / "hls" / piece
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        for _attempt in range(8):
            shutil.rmtree(project, ignore_errors=True)
            cfg = hls4ml.utils.config_from_pytorch_model(
                model, input_shape=(n_in,), granularity="name",
                default_precision=opts.precision, default_reuse_factor=reuse,
                backend="VivadoAccelerator")
            cfg["Model"]["Strategy"] = "Resource" if reuse > 1 else "Latency"
            hls = hls4ml.converters.convert_from_pytorch_model(
                model, hls_config=cfg, output_dir=str(project), project_name=piece,
                backend="VivadoAccelerator", board=spec.fpga["hls4ml_board"],
                io_type="io_parallel")
            # hls4ml moves a reuse factor to the nearest one valid for each layer
            used = [int(layer.get_attr("reuse_factor")) for layer in hls.get_layers()
                    if layer.class_name == "Dense"]
            est = estimate(layers, spec, opts, used)
            if est.fits or opts.reuse:
                break
            reuse = math.ceil(reuse * 1.5)
        if not est.fits:
            raise SplitcError(
                f"FPGA piece {piece} does not fit {spec.fpga['part']} ({spec.name}), estimated: "
                f"{est.dsp} DSP slices of {est.dsp_available}, {est.bram36} 36 Kb block RAMs "
                f"of {est.bram36_available} ({est.multipliers:,} multipliers at reuse factors "
                f"{used}, {opts.width()}-bit weights). Raise --fpga-reuse, narrow "
                "--fpga-precision, or give the piece fewer layers")
        hls.compile()
    lib = next((project / "firmware").glob(f"{piece}-*.so"), None)
    if lib is None:
        raise SplitcError(f"hls4ml did not build the C simulation of {piece}: "
                          f"{chatter.getvalue()[-2000:]}")
    shutil.copy(lib, folder / f"{piece}.so")
    write_build_notes(project, piece, spec)
    log(f"  {piece}: hls4ml project {project} ({opts.precision}, reuse factors {used}); "
        f"estimated {est.dsp} of {est.dsp_available} DSP, {est.bram36} of "
        f"{est.bram36_available} BRAM36, {est.cycles} cycles, latency {est.latency_s * 1e6:.1f}"
        " us (estimates)")
    return {"emulation": f"{piece}.so", "sha256": sha256_file(folder / f"{piece}.so"),
            "symbol": f"{piece}_float", "in_size": n_in, "out_size": n_out,
            "project": f"hls/{piece}", "precision": opts.precision, "reuse": used,
            "estimate": {**asdict(est), "label": "estimate, not a synthesis result"}}


def write_build_notes(project: Path, piece: str, spec) -> None:
    """``BUILD.md`` and ``build.sh``: what a user runs where the vendor tools are."""
    fab = spec.fpga
    script = f"""#!/bin/sh
# Build the bitstream of splitc piece {piece} for {spec.name} ({fab['part']}).
# Needs Vivado HLS and Vivado (2019.2 - 2020.1, as hls4ml's VivadoAccelerator backend).
set -e
cd "$(dirname "$0")"
vivado_hls -f build_prj.tcl "reset=1 csim=0 synth=1 cosim=0 validation=0 export=1 vsynth=0"
vivado -mode batch -source design.tcl
cp {piece}_vivado_accelerator/project_1.runs/impl_1/design_1_wrapper.bit ../../{piece}.bit
cp {piece}_vivado_accelerator/project_1.srcs/sources_1/bd/design_1/hw_handoff/design_1.hwh \\
   ../../{piece}.hwh
echo "copy the device folder (with {piece}.bit and {piece}.hwh) to the board and run:"
echo "  python -m splitc.runtime.worker <device folder> --fpga board --bind tcp://0.0.0.0:5555"
"""
    (project / "build.sh").write_text(script)
    (project / "build.sh").chmod(0o755)
    (project / "BUILD.md").write_text(f"""# Piece {piece} on {spec.name}

This folder is an hls4ml project (VivadoAccelerator backend, board `{fab['hls4ml_board']}`,
part `{fab['part']}`, {fab['clock_mhz']} MHz):

- `firmware/` — the HLS C++ sources (`{piece}.cpp`, `{piece}_axi.cpp`, weights, `nnet_utils/`);
- `build_prj.tcl` — Vivado HLS synthesis and IP export; `design.tcl` — the Vivado block
  design (Zynq PS + AXI DMA + this IP) and bitstream;
- `axi_stream_driver.py` — hls4ml's PYNQ overlay driver (splitc's worker does the same DMA
  transfers in `splitc.runtime.fpga`).

Build on a machine with the vendor tools: `./build.sh`. It leaves `{piece}.bit` and
`{piece}.hwh` in the device folder; copy that folder to the board and start the worker with
`--fpga board`. Until then the worker runs the bit-accurate C simulation (`--fpga emulation`,
the default), which computes the same fixed-point results, not at the fabric's speed.
""")


def write_device(dev: Device, spec, module: tvm.IRModule, weights: dict[str, list[np.ndarray]],
                 plan: Plan, folder: Path, opts: FpgaOptions,
                 log: Callable[[str], None]) -> Device:
    """Build every piece of ``dev`` (an FPGA target) and write its manifest."""
    pieces = {}
    for piece in plan.pieces_on(dev.name):
        layers = piece_layers(module[piece.name], weights[piece.name], piece.name)
        pieces[piece.name] = build_piece(piece.name, layers, spec, opts, folder, log)
    manifest = {"format": "splitc-fpga/1", "target": spec.name, "part": spec.fpga["part"],
                "board": spec.fpga["hls4ml_board"], "clock_mhz": spec.fpga["clock_mhz"],
                "pieces": pieces}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    np.savez(folder / dev.weights)  # the weights live in the HLS projects
    for piece in pieces:
        log(f"  {dev.name} ({spec.name}): to build the bitstream where Vivado is installed, run "
            f"{folder / 'hls' / piece / 'build.sh'} (see BUILD.md there); until then the "
            "worker runs the bit-accurate C simulation (--fpga emulation)")
    return dataclasses.replace(dev, lib=MANIFEST, lib_sha256=sha256_file(folder / MANIFEST),
                               weights_sha256=sha256_file(folder / dev.weights), kind=KIND)


@dataclass
class PrecisionReport:
    piece: str
    max_abs_error: float
    relative_error: float
    agreement: float
    samples: int


def check_precision(out_dir: str | Path, mod: tvm.IRModule, x: np.ndarray,
                    min_agreement: float, log: Callable[[str], None]) -> list[PrecisionReport]:
    """Run each FPGA piece's emulation inside the float model on ``x``: its error against
    float, and the model's top-1 agreement with float; raise below ``min_agreement``."""
    out = Path(out_dir)
    plan = Plan.load(out)
    program = TorchProgram(mod)
    xs = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.no_grad():
        floats = program.run(xs)
    reference = floats[program.outputs[0]].numpy()
    reports = []
    for dev in plan.devices:
        if dev.kind != KIND:
            continue
        fpga = FpgaPieces(out / dev.dir)
        for piece in plan.pieces_on(dev.name):
            precision = FpgaOptions(fpga.manifest["pieces"][piece.name]["precision"])
            src, dst = piece.inputs[0], piece.outputs[0]
            inputs = floats[src].numpy()
            got = np.stack([fpga.run(piece.name, v, plan.tensors[dst].shape[1:])
                            for v in inputs])
            want = floats[dst].numpy()
            with torch.no_grad():
                final = program.run(xs, override={dst: torch.from_numpy(got)})
            agree = float((final[program.outputs[0]].numpy().argmax(-1)
                           == reference.argmax(-1)).mean())
            err = float(np.abs(got - want).max())
            rep = PrecisionReport(piece.name, err, err / (float(np.abs(want).max()) or 1.0),
                                  agree, len(x))
            reports.append(rep)
            log(f"{piece.name} on {dev.target}: max abs error vs float {err:.3g} (relative "
                f"{rep.relative_error:.3g}); the model's top-1 agrees with float on "
                f"{agree * 100:.1f} % of {len(x)} calibration inputs")
            if agree < min_agreement:
                raise SplitcError(
                    f"precision {precision.precision} on {piece.name}: top-1 agreement "
                    f"{agree * 100:.1f} % on calibration data is below "
                    f"{min_agreement * 100:.1f} %; give a wider --fpga-precision (e.g. "
                    f"{precision.wider()}) or lower --fpga-min-agreement")
    return reports
