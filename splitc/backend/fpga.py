"""FPGA pieces: a piece assigned to an FPGA target becomes an hls4ml project.

TVM's VTA is gone upstream (see ``../shared/FPGA_NOTES.md``); splitc's FPGA path is hls4ml,
reached beside TVM: the piece's Relax function — convolutions (depthwise and grouped), pooling,
activations, residual adds, flattening and dense layers — is read into hls4ml's own layer list
(:mod:`splitc.backend.hls_graph`: channels last, weights re-laid out to match) and handed to
``ModelGraph.from_layer_list`` with a fixed-point precision and per-layer reuse factors, in
``io_stream`` when the piece holds feature maps (so they stream through line buffers and need
not fit on chip) and ``io_parallel`` for dense layers alone. (hls4ml's PyTorch and ONNX front
ends were tried first: the PyTorch one ignores a convolution's groups and takes no global
pooling; the ONNX one needs an older ``onnx``.) hls4ml writes the HLS C++ project for the part
(``VivadoAccelerator`` backend: the HLS sources, the Vivado block design with an AXI DMA, build
scripts and the PYNQ overlay driver) and compiles its bit-accurate C simulation with g++. The
device folder gets::

    OUT/<device>/fpga.json          the manifest the worker reads (:mod:`splitc.runtime.fpga`)
    OUT/<device>/<piece>.so         the C simulation, what the worker runs in emulation
    OUT/<device>/hls/<piece>/       the project a user takes to the vendor tools (BUILD.md)

Before anything is generated, each piece gets a resource and latency **estimate**
(:func:`splitc.backend.hls_graph.estimate`: multipliers against DSP slices, weight memories and
stream FIFOs against block RAM, cycles at the fabric clock); a piece that does not fit the part
is refused with the numbers. The C simulation reads and writes flat channels-last vectors; the
manifest records each piece's input and output :class:`~splitc.backend.hls_graph.Layout` and
the worker converts the plan's NCHW tensors accordingly. After the
compile, :func:`check_precision` runs the emulated pieces inside the float model on
calibration data and refuses a precision whose top-1 agreement falls below a threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from splitc import optional
from splitc.backend.hls_graph import (
    COMPUTE,
    OUTPUT_EXTRA_BITS,
    Estimate,
    Fabric,
    PieceGraph,
    choose_reuse,
    estimate,
    piece_graph,
)
from splitc.backend.torch_program import TorchProgram
from splitc.errors import SplitcError
from splitc.runtime.fpga import FORMAT, KIND, MANIFEST, FpgaPieces, weights_digest
from splitc.runtime.plan import Device, Plan, sha256_file


@dataclass(frozen=True)
class FpgaOptions:
    """How FPGA pieces are generated and checked."""

    precision: str = "ap_fixed<16,6>"
    reuse: int | None = None          # None: per layer, the fastest that fits the part
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

    def wider(self, reach: float = 0.0) -> str:
        """A wider type to suggest: 8 more bits, 2 more of them integer (or as many as
        values reaching ``reach`` need)."""
        total, integer = self.bits()
        need = math.ceil(math.log2(reach)) + 1 if reach >= 1 else 0
        grow = max(2, need - integer)
        return f"ap_fixed<{total + max(8, grow)},{integer + grow}>"

    def grown(self, bits: int) -> str:
        """The type with ``bits`` more integer bits and the same fraction (and modes)."""
        total, integer = self.bits()
        kind = self.precision.split("<", 1)[0].strip()
        modes = self.precision.split(">", 1)[0].split(",")[2:]
        return f"{kind}<{','.join([str(total + bits), str(integer + bits), *modes])}>"

    def constant_type(self) -> str:
        """The type weights and biases are written in: the precision's bits, rounded to the
        nearest and saturated when the precision names no modes. They are constants, so
        these modes cost nothing on the fabric (they apply when the C++ converts each value
        once); truncating 16-bit weights instead biased a 256-input dense layer's sums by
        0.4 (a trained digits CNN)."""
        if self.precision.count(",") >= 2:  # modes given: the user's
            return self.precision
        return self.precision.replace(">", ",AP_RND_CONV,AP_SAT>")


@dataclass(frozen=True)
class Priced:
    """A piece priced for the fabric before anything is built: its graph and estimate with
    the reuse factors :func:`~splitc.backend.hls_graph.choose_reuse` picked."""

    graph: PieceGraph
    reuse: dict[str, int]
    estimate: Estimate

    def refusal(self, spec, opts: FpgaOptions) -> str:
        """Why the piece does not fit, with the numbers (empty when it fits)."""
        est = self.estimate
        if est.fits:
            return ""
        worst = max(est.layers, key=lambda row: row["dsp"])
        return (f"FPGA piece {self.graph.piece} does not fit {spec.fpga['part']} ({spec.name}), "
                f"estimated: {est.dsp} DSP slices of {est.dsp_available}, {est.bram36} 36 Kb "
                f"block RAMs of {est.bram36_available}"
                + (f", {est.lut:,} LUTs in multipliers of {est.lut_available:,}"
                   if est.lut else "")
                + f" ({est.multipliers:,} multipliers at "
                f"reuse factors {self.reuse}, {opts.width()}-bit weights; the most: "
                f"{worst['name']} ({worst['op']}) with {worst['dsp']} DSP)")


def price(func: relax.Function, weights: list[np.ndarray] | None, piece: str, spec,
          opts: FpgaOptions) -> Priced:
    """Read an FPGA piece's layers (:func:`~splitc.backend.hls_graph.piece_graph`; an op the
    fabric does not take raises) and choose its reuse factors for ``spec``'s part."""
    graph = piece_graph(func, weights, piece)
    reuse, est = choose_reuse(graph, Fabric.of(spec), opts.width(), opts.reuse)
    return Priced(graph, reuse, est)


def hls_layer_list(graph: PieceGraph) -> list[dict]:
    """The graph as hls4ml's converters hand layers to ``ModelGraph.from_layer_list`` (the
    Keras front end's fields, channels last)."""
    out = []
    for layer in graph.layers:
        d: dict = {"name": layer.name, "inputs": list(layer.inputs)}
        if layer.op == "input":
            d = {"name": layer.name, "class_name": "InputLayer",
                 "input_shape": list(layer.out)}
        elif layer.op in ("conv2d", "depthwise2d"):
            h, w, cin = layer.in_shape
            ho, wo, cout = layer.out
            (fh, fw), (sh, sw) = layer.attrs["kernel"], layer.attrs["stride"]
            pt, pb, pl, pr = layer.attrs["pad"]
            d.update(data_format="channels_last", bias_data=layer.bias, in_height=h,
                     in_width=w, n_chan=cin, n_filt=cout, filt_height=fh, filt_width=fw,
                     stride_height=sh, stride_width=sw, pad_top=pt, pad_bottom=pb,
                     pad_left=pl, pad_right=pr, out_height=ho, out_width=wo)
            if layer.op == "conv2d":
                d.update(class_name="Conv2D", weight_data=layer.weight)
            else:
                d.update(class_name="DepthwiseConv2D", depthwise_data=layer.weight,
                         depth_multiplier=layer.attrs["multiplier"])
        elif layer.op in ("max_pool2d", "avg_pool2d"):
            h, w, c = layer.in_shape
            ho, wo, _ = layer.out
            (ph, pw), (sh, sw) = layer.attrs["pool"], layer.attrs["stride"]
            d.update(class_name="MaxPooling2D" if layer.op == "max_pool2d"
                     else "AveragePooling2D", data_format="channels_last", in_height=h,
                     in_width=w, n_filt=c, pool_height=ph, pool_width=pw, stride_height=sh,
                     stride_width=sw, padding="valid", out_height=ho, out_width=wo, pad_top=0,
                     pad_bottom=0, pad_left=0, pad_right=0, count_pad=False)
        elif layer.op == "zero_pad":
            h, w, c = layer.in_shape
            ho, wo, _ = layer.out
            pt, pb, pl, pr = layer.attrs["pad"]
            d.update(class_name="ZeroPadding2D", data_format="channels_last", in_height=h,
                     in_width=w, n_chan=c, out_height=ho, out_width=wo, pad_top=pt,
                     pad_bottom=pb, pad_left=pl, pad_right=pr)
        elif layer.op == "global_avg_pool":
            h, w, c = layer.in_shape
            d.update(class_name="GlobalAveragePooling2D", data_format="channels_last",
                     in_height=h, in_width=w, n_filt=c, keepdims=False)
        elif layer.op == "act":
            d.update(class_name="Activation", activation=layer.attrs["activation"])
        elif layer.op == "add":
            d.update(class_name="Merge", op="add")
        elif layer.op == "flatten":
            d.update(class_name="Reshape", target_shape=list(layer.out))
        elif layer.op == "dense":
            n_in, n_out = layer.weight_shape
            d.update(class_name="Dense", weight_data=layer.weight, bias_data=layer.bias,
                     n_in=n_in, n_out=n_out, weight_quantizer=None, bias_quantizer=None)
        else:  # pragma: no cover - piece_graph makes no other op
            raise SplitcError(f"no hls4ml layer for {layer.op}")
        out.append(d)
    return out


def hls_config(graph: PieceGraph, reuse: dict[str, int], opts: FpgaOptions) -> dict:
    """hls4ml's ``HLSConfig``: ``--fpga-precision`` for weights, biases and every layer's
    result (what the option promises: the type of weights and activations) but the output
    layers', which get :data:`~splitc.backend.hls_graph.OUTPUT_EXTRA_BITS` more integer bits;
    accumulators wide enough not to overflow (hls4ml infers them); per layer its reuse
    factor, the Latency strategy at factor 1 and Resource above."""
    p = opts.precision
    total, integer = opts.bits()
    wide = opts.grown(OUTPUT_EXTRA_BITS)
    layers = {}
    tail = graph.tail
    for layer in graph.layers:
        precision = {"result": wide if layer.name in tail else p}
        if layer.op in COMPUTE:
            precision.update(weight=opts.constant_type(), bias=opts.constant_type(),
                             accum="auto")
        elif layer.op in ("avg_pool2d", "global_avg_pool"):
            # the sum of a pooling window before the division
            grow = math.ceil(math.log2(max(2, math.prod(layer.in_shape[:-1])))) + 1
            precision["accum"] = f"ap_fixed<{total + grow},{integer + grow}>"
        entry: dict = {"Precision": precision, "Trace": False}
        if layer.op in COMPUTE:
            r = reuse.get(layer.name, 1)
            entry.update(ReuseFactor=r, Strategy="Resource" if r > 1 else "Latency")
        layers[layer.name] = entry
    return {"Model": {"Precision": {"default": p}, "ReuseFactor": 1, "Strategy": "Latency",
                      "BramFactor": 1_000_000_000, "TraceOutput": False},
            "LayerName": layers}


def build_piece(piece: str, priced: Priced, spec, opts: FpgaOptions, folder: Path,
                log: Callable[[str], None]) -> dict:
    """Generate and compile one piece's hls4ml project; returns its manifest entry."""
    hls4ml = optional.hls4ml()
    if not priced.estimate.fits:
        raise SplitcError(priced.refusal(spec, opts) + ". Raise --fpga-reuse, narrow "
                          "--fpga-precision, or give the piece fewer layers")
    graph = priced.graph
    project = folder / "hls" / piece
    shutil.rmtree(project, ignore_errors=True)
    chatter = io.StringIO()
    fab = spec.fpga
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hls4ml's notes on what its own passes override
        config = hls4ml.utils.config.create_config(
            output_dir=str(project), project_name=piece, backend="VivadoAccelerator",
            board=fab["hls4ml_board"], clock_period=round(1000 / fab["clock_mhz"], 3),
            io_type=graph.io_type)
        config["HLSConfig"] = hls_config(graph, priced.reuse, opts)
        try:
            hls = hls4ml.model.ModelGraph.from_layer_list(config, hls_layer_list(graph))
        except Exception as e:  # hls4ml refuses with assorted exception types
            raise SplitcError(f"hls4ml did not take FPGA piece {piece} "
                              f"({graph.describe()}): {type(e).__name__}: {e}") from None
        # hls4ml may move a reuse factor to one valid for its layer: price what it built
        used = {layer.name: int(layer.get_attr("reuse_factor")) for layer in hls.get_layers()
                if layer.name in priced.reuse}
        est = estimate(graph, Fabric.of(spec), opts.width(), used)
        if not est.fits:
            raise SplitcError(Priced(graph, used, est).refusal(spec, opts))
        hls.write()
    weights = compile_emulation(project, piece, folder)
    write_build_notes(project, piece, spec)
    for note in graph.notes:
        log(f"  {piece}: {note}")
    log(f"  {piece}: hls4ml project {project} ({graph.describe()}; {graph.io_type}, "
        f"{opts.precision}, reuse factors {used}); estimated {est.dsp} of "
        f"{est.dsp_available} DSP, {est.bram36} of {est.bram36_available} BRAM36, "
        f"{est.cycles:,} cycles, latency {est.latency_s * 1e6:.1f} us at "
        f"{fab['clock_mhz']} MHz (estimates: no synthesis here)")
    return {"emulation": f"{piece}.so", "sha256": sha256_file(folder / f"{piece}.so"),
            "symbol": f"{piece}_float", "weights_dir": weights.name,
            "weights_sha256": weights_digest(weights),
            "weights_setter": f"{piece}_set_weights_dir", "in_size": graph.input.size,
            "out_size": graph.output.size, "input": graph.input.to_json(),
            "output": graph.output.to_json(), "io_type": graph.io_type,
            "project": f"hls/{piece}", "precision": opts.precision, "reuse": used,
            "layers": graph.describe(), "hidden": graph.hidden, "estimate": est.to_json()}


#: Where the C simulation reads its weights: hls4ml's build bakes the project's absolute path
#: in (``WEIGHTS_DIR``), so a device folder copied elsewhere, or whose ``hls/`` is left behind,
#: made the worker exit. splitc builds it with this shim instead; the worker sets the folder.
WEIGHTS_SHIM = """#include <string>
namespace {{ std::string weights_dir; }}
extern "C" void {piece}_set_weights_dir(const char *dir) {{ weights_dir = dir; }}
const char *{piece}_weights_dir() {{ return weights_dir.c_str(); }}
"""


def compile_emulation(project: Path, piece: str, folder: Path) -> Path:
    """Compile the project's bit-accurate C simulation into ``folder/<piece>.so`` with g++,
    as hls4ml's ``build_lib.sh`` does but reading its weights from a folder the worker names
    (``folder/<piece>.weights``, copied here). Returns that folder."""
    weights = folder / f"{piece}.weights"
    shutil.rmtree(weights, ignore_errors=True)
    shutil.copytree(project / "firmware" / "weights", weights,
                    ignore=shutil.ignore_patterns("*.h"))
    (project / "splitc_weights.h").write_text(f"const char *{piece}_weights_dir();\n")
    (project / "splitc_weights.cpp").write_text(WEIGHTS_SHIM.format(piece=piece))
    flags = ["-O3", "-fPIC", "-std=c++11", "-Ifirmware/ap_types/",
             f"-DWEIGHTS_DIR={piece}_weights_dir()", "-include", "splitc_weights.h"]
    sources = [f"firmware/{piece}.cpp", f"firmware/{piece}_axi.cpp", f"{piece}_bridge.cpp",
               "splitc_weights.cpp"]
    at_once = max(1, min(len(sources), os.cpu_count() or 1))
    for i in range(0, len(sources), at_once):
        jobs = [(src, subprocess.Popen(["g++", *flags, "-c", src, "-o",
                                        f"{Path(src).stem}.o"], cwd=project,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)) for src in sources[i:i + at_once]]
        for src, job in jobs:
            said, _ = job.communicate()
            if job.returncode:
                raise SplitcError(f"g++ did not compile {project / src} (the C simulation "
                                  f"of {piece}): {said[-2000:]}")
    objects = [f"{Path(src).stem}.o" for src in sources]
    link = subprocess.run(["g++", "-shared", *objects, "-o", str((folder / f"{piece}.so")
                                                                   .resolve())],
                          cwd=project, capture_output=True, text=True)
    for o in objects:
        (project / o).unlink(missing_ok=True)
    if link.returncode:
        raise SplitcError(f"g++ did not link the C simulation of {piece}: "
                          f"{link.stderr[-2000:]}")
    return weights


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
        priced = price(module[piece.name], weights[piece.name], piece.name, spec, opts)
        pieces[piece.name] = build_piece(piece.name, priced, spec, opts, folder, log)
    manifest = {"format": FORMAT, "target": spec.name, "part": spec.fpga["part"],
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
            entry = fpga.manifest["pieces"][piece.name]
            precision = FpgaOptions(entry["precision"])
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
                # the largest value the piece's tensors held at the precision reach in float:
                # beyond the type's range fixed point wraps, and more integer bits help
                reach = max([float(floats[t].abs().max()) for t in entry.get("hidden", [])
                             if t in floats], default=0.0)
                integer = precision.bits()[1]
                limit = 2.0 ** (integer - 1)
                over = (f"; its values reach {reach:.3g} in float, beyond the type's range "
                        f"+-{limit:g}" if reach >= limit else "")
                raise SplitcError(
                    f"precision {precision.precision} on {piece.name}: top-1 agreement "
                    f"{agree * 100:.1f} % on calibration data is below "
                    f"{min_agreement * 100:.1f} %{over}; give a wider --fpga-precision (e.g. "
                    f"{precision.wider(reach)}) or lower --fpga-min-agreement")
    return reports
