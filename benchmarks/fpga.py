"""Which layers of a small CNN fit the PYNQ-Z1's fabric (xc7z020), and at what cost.

The model is cut at every layer boundary one tensor crosses (a convolution with its bias and
activation is one layer; a residual block, whose skip tensor crosses its insides, stays one
piece), each piece is read into hls4ml's layers as an FPGA piece would be
(:func:`splitc.backend.fpga.price`: reuse factors chosen per layer, the fastest that fit) and
its resource and latency **estimate** is printed: DSP slices, 36 Kb block RAMs, cycles and
latency at the fabric's clock (the 0.1 ms a call costs the driver and DMA set-up is left
out), and whether it fits. A piece holding an op the fabric has no layer for says which.
The whole model and its longest run of pieces that fits as one are estimated too. These are
estimates from splitc's model (``splitc/backend/hls_graph.py``), not synthesis results:
Vivado is not available here.

``--csim``: also build each fitting piece's hls4ml project and run its bit-accurate C
simulation on random inputs, against the float model (measured on this machine's CPU).

``--auto``: instead, ``auto``'s search on one rpi4 and one pynq-z1-fpga (published figures:
nothing is measured) for a 6 MFLOP residual CNN (conv 1->24 on 12x12, two residual blocks,
max pooling, dense; the model of ``tests/test_fpga_conv.py``), for latency and for throughput,
with ``plan --explain``'s account of each.

    .venv/bin/python benchmarks/fpga.py                       # resnet18 --tiny, seconds
    .venv/bin/python benchmarks/fpga.py --csim                # + C simulation, ~3 minutes
    .venv/bin/python benchmarks/fpga.py --model mobilenet_v2 --precision 'ap_fixed<8,3>'
    .venv/bin/python benchmarks/fpga.py --auto
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name

from splitc import frontend, targets
from splitc.backend.fpga import FpgaOptions, build_piece, price
from splitc.backend.torch_program import TorchProgram
from splitc.errors import SplitcError
from splitc.passes.analysis import cut_points
from splitc.passes.ir import main_block, op_name
from splitc.passes.split.pipeline import PipelinePlan, PipelineSplit
from splitc.planning.extract import extract
from splitc.runtime.fpga import MANIFEST, FpgaPieces

#: a layer starts at one of these (what follows it — bias, activation — belongs to it)
STARTS = {"nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d", "mean", "nn.adaptive_avg_pool2d",
          "matmul"}




def layer_cuts(mod) -> tuple[int, ...]:
    """Binding indices after which one tensor crosses and a new layer starts."""
    bindings = list(main_block(mod).bindings)
    return tuple(c.index for c in cut_points(mod)
                 if len(c.crossing) == 1 and op_name(bindings[c.index + 1].value) in STARTS)


def label(graph) -> str:
    """A piece's layers in a few words: kernel, channels, output size."""
    parts = []
    for layer in graph.layers[1:]:
        if layer.op in ("conv2d", "depthwise2d"):
            (kh, kw), (s, _) = layer.attrs["kernel"], layer.attrs["stride"]
            cin, (ho, wo, cout) = layer.in_shape[-1], layer.out
            kind = "dw " if layer.op == "depthwise2d" else ""
            parts.append(f"{kind}conv {kh}x{kw}{f'/{s}' if s > 1 else ''} {cin}->{cout} "
                         f"@{ho}x{wo}")
        elif layer.op in ("max_pool2d", "avg_pool2d"):
            parts.append(f"{layer.op.split('_')[0]}pool {layer.attrs['pool'][0]}")
        elif layer.op == "global_avg_pool":
            parts.append("global avgpool")
        elif layer.op == "dense":
            parts.append(f"dense {layer.weight_shape[0]}->{layer.weight_shape[1]}")
        elif layer.op == "add":
            parts.append("+ skip")
    return ", ".join(parts)


def refusal(message: str, piece: str) -> str:
    """A refusal without the piece's name and the list of what the fabric takes."""
    why = message.removeprefix(f"FPGA piece {piece}").lstrip(": ")
    return why.split(", which the hls4ml path")[0]


def relax_label(func) -> str:
    ops = [op_name(b.value) for b in main_block_of(func).bindings]
    return ", ".join(o for o in ops if o in STARTS or o == "add")


def main_block_of(func):
    import tvm

    return main_block(tvm.IRModule({"main": func}))


def estimate_pieces(mod, cuts, spec, opts):
    """(piece name, function, weights, Priced or the refusal) for each piece of the split."""
    n = len(cuts) + 1
    ex = extract(PipelineSplit(PipelinePlan(cuts, tuple(range(n))))(mod))
    out = []
    for module in ex.modules.values():
        for gv, func in module.functions.items():
            name = gv.name_hint
            weights = ex.weights[name]
            try:
                out.append((name, func, weights, price(func, weights, name, spec, opts)))
            except SplitcError as e:
                out.append((name, func, weights, str(e)))
    order = [p.name for p in ex.pieces]
    return sorted(out, key=lambda row: order.index(row[0])), ex


def longest_fitting_run(mod, cuts, pieces, spec, opts):
    """(first, end, Priced) of the longest run of consecutive pieces that fits as one piece
    (the first such run from the input side), or None. ``pieces``: each piece alone, as
    :func:`estimate_pieces` gave them (a run holding a refused one is refused too)."""
    n = len(cuts) + 1
    refused = [isinstance(p[3], str) for p in pieces]
    for length in range(n, 0, -1):
        for first in range(n - length + 1):
            end = first + length  # pieces first .. end-1 merged: drop the cuts between them
            if any(refused[first:end]):
                continue
            merged = cuts[:first] + cuts[end - 1:]
            priced = estimate_pieces(mod, merged, spec, opts)[0][first][3]
            if not isinstance(priced, str) and priced.estimate.fits:
                return first, end, priced
    return None


def csim_error(name, func, weights, priced, spec, opts, folder: Path, n: int) -> float:
    """Max abs error of the piece's C simulation against torch's float on ``n`` inputs."""
    import tvm

    entry = build_piece(name, priced, spec, opts, folder, lambda _m: None)
    (folder / MANIFEST).write_text(json.dumps({"format": "splitc-fpga/2",
                                               "pieces": {name: entry}}))
    fabric = FpgaPieces(folder)
    program = TorchProgram(tvm.IRModule({"main": func}))
    shape = [int(d) for d in func.params[0].ty.shape.values]
    x = np.random.default_rng(0).uniform(0, 1, (n, *shape)).astype("float32")
    params = [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in weights]
    errors = []
    for v in x:
        with torch.no_grad():
            want = program.run(torch.from_numpy(v), *params)[program.outputs[0]].numpy()
        got = fabric.run(name, v, want.shape)
        errors.append(float(np.abs(got - want).max()))
    return max(errors)


class Block(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = torch.nn.Conv2d(c, c, 3, padding=1)
        self.b = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def auto(output: Path | None, board: str = "rpi4") -> None:
    """``auto`` on ``board`` + pynq-z1-fpga for the small CNN, both objectives, explained."""
    import warnings

    from splitc.planning.cluster import Cluster
    from splitc.planning.search import search
    from splitc.planning.speeds import cluster_speeds

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.ReLU(),
                                Block(24), Block(24), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(24 * 6 * 6, 10)).eval()
    scratch = tempfile.TemporaryDirectory(prefix="splitc-fpga-auto-")
    path = Path(scratch.name) / "cnn.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17)
    mod = frontend.load(str(path)).mod
    scratch.cleanup()
    cluster = Cluster.uniform([board, "pynq-z1-fpga"])
    lines = [f"# auto on {board} + pynq-z1-fpga, {time.strftime('%Y-%m-%d %H:%M')}: published "
             "figures and hls4ml estimates, nothing measured"]
    for objective in ("latency", "throughput"):
        result = search(mod, cluster, cluster_speeds(cluster), objective=objective)
        lines += ["", f"## --objective {objective}: best {result.best.label}",
                  result.explain(cluster)]
    text = "\n".join(lines)
    print(text)
    if output:
        output.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--full-size", action="store_true", help="not the zoo's --tiny variant")
    ap.add_argument("--target", default="pynq-z1-fpga")
    ap.add_argument("--precision", default="ap_fixed<16,6>")
    ap.add_argument("--csim", action="store_true")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--auto", action="store_true")
    ap.add_argument("--board", default="rpi4", help="with --auto: the CPU board beside the fabric")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    if args.auto:
        auto(args.output, args.board)
        return

    spec = targets.get(args.target)
    opts = FpgaOptions(args.precision)
    tiny = not args.full_size and not args.model.endswith(".onnx")
    imported = frontend.load(args.model, tiny=tiny)
    mod = imported.mod
    t0 = time.perf_counter()
    pieces, ex = estimate_pieces(mod, layer_cuts(mod), spec, opts)
    fab = spec.fpga
    clock = fab["clock_mhz"] * 1e6
    lines = [f"# {args.model}{' (tiny)' if tiny else ''} on {spec.name} ({fab['part']}: "
             f"{fab['dsp']} DSP, {fab['bram36']} BRAM36, {fab['clock_mhz']} MHz) at "
             f"{opts.precision}, {time.strftime('%Y-%m-%d %H:%M')}",
             "# estimates (splitc/backend/hls_graph.py), not synthesis results"
             + (f"; C simulation measured on {cpu_name()}" if args.csim else ""),
             "",
             "| layer | DSP | BRAM36 | cycles | latency at "
             f"{fab['clock_mhz']:g} MHz | fits |" + (" C-sim max abs error |" if args.csim
                                                     else ""),
             "|---|---|---|---|---|---|" + ("---|" if args.csim else "")]
    scratch = tempfile.TemporaryDirectory(prefix="splitc-fpga-bench-")
    tmp = Path(scratch.name)
    for name, func, weights, priced in pieces:
        if isinstance(priced, str):
            lines.append(f"| {relax_label(func)} | | | | | no: {refusal(priced, name)} |"
                         + (" |" if args.csim else ""))
            continue
        est = priced.estimate
        fits = "yes" if est.fits else "**no**"
        row = (f"| {label(priced.graph)} | {est.dsp} | {est.bram36} | {est.cycles:,} | "
               f"{est.cycles / clock * 1e6:,.1f} us | {fits} |")
        if args.csim:
            err = csim_error(name, func, weights, priced, spec, opts, tmp / name,
                             args.samples) if est.fits else None
            row += f" {err:.3g} |" if err is not None else " |"
        lines.append(row)
    scratch.cleanup()
    # the whole model, and the longest run of consecutive pieces that fits as one piece
    everything, _ = estimate_pieces(mod, (), spec, opts)
    whole = everything[0][3]
    lines.append("")
    lines.append("whole model as one piece: " + (
        f"refused: {refusal(whole, everything[0][0])}" if isinstance(whole, str) else
        f"{whole.estimate.short()} (reuse {whole.reuse}), fits: {whole.estimate.fits}"))
    run = longest_fitting_run(mod, layer_cuts(mod), pieces, spec, opts)
    if run:
        first, last, priced = run
        lines.append(f"longest run that fits as one piece: rows {first + 1}-{last} of "
                     f"{len(pieces)} ({priced.graph.describe()}): {priced.estimate.short()}, "
                     f"reuse factors {priced.reuse}")
    lines.append(f"(estimated in {time.perf_counter() - t0:.1f} s)")
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
