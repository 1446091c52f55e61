"""Convolutions on the FPGA (issue 24): a residual CNN split host + pynq-z1-fpga runs over
ZeroMQ with its fabric piece in hls4ml's C simulation and gives ONNX Runtime's top-1; feature
maps reach the fabric channels last and come back NCHW (a wrong layout is visibly wrong), and
the C simulation runs from a copied device folder;
the resource and latency estimates are the stated model and the reuse factors the fastest
that fit; a piece too big or holding an op the fabric has no layer for is refused with the
numbers or the op; ``auto`` puts a CNN segment on the fabric when its estimates pay and says
why in ``plan --explain``."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from splitc import frontend, targets
from splitc.backend.fpga import FpgaOptions, build_piece, price
from splitc.backend.hls_graph import (
    Fabric,
    choose_reuse,
    estimate,
    piece_graph,
    valid_reuse_factors,
)
from splitc.driver import compile_model
from splitc.errors import SplitcError
from splitc.passes.ir import lift_weights
from splitc.planning.cluster import Cluster
from splitc.planning.search import search
from splitc.planning.speeds import cluster_speeds
from splitc.runtime.client import connect
from splitc.runtime.fpga import MANIFEST, FpgaPieces
from splitc.runtime.plan import PlanError

pytest.importorskip("hls4ml")
FABRIC = targets.get("pynq-z1-fpga")


def export(model: torch.nn.Module, shape, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17)
    return path


def relax_main(model: torch.nn.Module, shape, path: Path):
    """The model's imported ``main`` with its weights lifted into parameters, as a piece is."""
    return lift_weights(frontend.load(str(export(model, shape, path))).mod["main"])


class ResidualCNN(torch.nn.Module):
    """conv + batch norm, a residual block, max pooling, a depthwise and a pointwise
    convolution, dense: 1x8x8 digits -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.c2(torch.relu(self.c1(x))))
        x = self.pool(x)
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    """ResidualCNN trained on scikit-learn's digits (as ONNX); 256 digits to check the split
    on and 256 others as calibration data."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("fpga-cnn")
    d = load_digits()
    x = (d.data / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    y = d.target.astype("int64")
    torch.manual_seed(0)
    model = ResidualCNN()
    # weight decay keeps the logits inside ap_fixed<16,6>'s +-32 (the output layer has 8
    # integer bits more, but the hidden ones hold the precision's)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(10):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = export(model, (1, 1, 8, 8), folder / "digits_cnn.onnx")
    np.savez(folder / "calibration.npz", x=x[256:512], y=y[256:512])
    return path, folder / "calibration.npz", x[:256]


def test_a_residual_cnn_on_host_and_fabric_over_zeromq_gives_onnxruntimes_top1(digits_cnn,
                                                                               tmp_path):
    from splitc import optional

    model, calibration, x = digits_cnn
    out = tmp_path / "out"
    said = []
    plan = compile_model(str(model), out, strategy="pipeline",
                         cluster=Cluster.uniform(["host", "pynq-z1-fpga"]),
                         calibration=calibration, log=said.append)
    assert [d.target for d in plan.devices] == ["host", "pynq-z1-fpga"]
    manifest = json.loads((out / "dev1" / MANIFEST).read_text())
    (piece,) = manifest["pieces"]
    entry = manifest["pieces"][piece]
    ops = {row["op"] for row in entry["estimate"]["layers"]}
    assert {"conv2d", "add", "max_pool2d", "dense"} <= ops, ops  # the block, pooling, dense
    assert entry["io_type"] == "io_stream"
    c, h, w = plan.tensors[plan.pieces_on("dev1")[0].inputs[0]].shape[1:]
    assert entry["input"] == {"stored": [h, w, c], "order": [1, 2, 0]}  # channels last
    est = entry["estimate"]
    assert est["fits"] and est["dsp"] <= 220 and est["bram36"] <= 140
    assert est["label"].startswith("estimate")
    # the HLS project, with the script that takes it to a bitstream where Vivado is
    project = out / "dev1" / entry["project"]
    for f in (f"firmware/{piece}.cpp", f"firmware/{piece}_axi.cpp", "build_prj.tcl",
              "design.tcl", "axi_stream_driver.py", "BUILD.md", "build.sh"):
        assert (project / f).exists(), f
    assert "hls::stream" in (project / f"firmware/{piece}.cpp").read_text()
    assert "xc7z020" in (project / "design.tcl").read_text()
    assert "vivado_hls -f build_prj.tcl" in (project / "build.sh").read_text()
    assert any("build.sh" in m for m in said)

    session_inputs = [[x[i:i + 1]] for i in range(len(x))]
    with connect(out, timeout=60) as session:
        got = np.concatenate([g[0] for g in session.infer_many(session_inputs, inflight=8)])
    ort = optional.onnxruntime().InferenceSession(str(model))
    want = np.concatenate([ort.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    err = float(np.abs(got - want).max())
    print(f"residual CNN, host + pynq-z1-fpga (C simulation) over ZeroMQ, {len(x)} digits: "
          f"top-1 agreement with ONNX Runtime {agree:.4f}, max abs error {err:.3g}; fabric "
          f"piece {entry['layers']}: {est['dsp']} DSP, {est['bram36']} BRAM36, "
          f"{est['cycles']} cycles (estimates)")
    assert agree >= 0.99, (agree, err)
    assert 0 < err < 0.5  # fixed point: close, not equal


class MapToMap(torch.nn.Module):
    """A piece that reads and writes feature maps shaped so that no two of C, H, W agree: a
    grouped convolution (2 groups), a depthwise one, max pooling with padding, average
    pooling, tanh, a pointwise convolution."""

    def __init__(self):
        super().__init__()
        self.grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.maxpool = torch.nn.MaxPool2d(2, 2, padding=1)
        self.pool = torch.nn.AvgPool2d(2)
        self.pw = torch.nn.Conv2d(6, 5, 1)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.dw(torch.relu(self.grouped(x)))))
        return self.pw(torch.tanh(self.pool(x)))


@pytest.fixture(scope="module")
def map_piece(tmp_path_factory):
    """MapToMap built as FPGA piece p0 in a device folder; the model and the manifest entry."""
    folder = tmp_path_factory.mktemp("map-piece")
    torch.manual_seed(1)
    model = MapToMap().eval()
    func, weights = relax_main(model, (1, 4, 6, 10), folder / "m.onnx")
    opts = FpgaOptions()
    priced = price(func, weights, "p0", FABRIC, opts)
    assert [layer.op for layer in priced.graph.layers] == [
        "input", "conv2d", "act", "depthwise2d", "act", "zero_pad", "max_pool2d", "avg_pool2d",
        "act", "conv2d"]
    assert any("block-diagonal" in n for n in priced.graph.notes)  # the 2 groups
    entry = build_piece("p0", priced, FABRIC, opts, folder, lambda _m: None)
    (folder / MANIFEST).write_text(json.dumps({"format": "splitc-fpga/2",
                                               "pieces": {"p0": entry}}))
    return model, folder, entry


def test_feature_maps_reach_the_fabric_channels_last_and_a_wrong_layout_shows(map_piece,
                                                                              tmp_path):
    model, folder, entry = map_piece
    assert entry["input"] == {"stored": [6, 10, 4], "order": [1, 2, 0]}
    assert entry["output"] == {"stored": [2, 3, 5], "order": [1, 2, 0]}
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 4, 6, 10)).astype("float32")
    with torch.no_grad():
        want = np.stack([model(torch.from_numpy(v)).numpy() for v in x])
    got = np.stack([FpgaPieces(folder).run("p0", v, (1, 5, 2, 3)) for v in x])
    err = float(np.abs(got - want).max())

    # the same C simulation fed the NCHW tensor as it lies, read back as NCHW
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong, ignore=shutil.ignore_patterns("hls"))
    (wrong / MANIFEST).write_text(json.dumps({"format": "splitc-fpga/2", "pieces": {
        "p0": dict(entry, input=None, output=None)}}))
    as_is = np.stack([FpgaPieces(wrong).run("p0", v, (1, 5, 2, 3)) for v in x])
    wrong_err = float(np.abs(as_is - want).max())
    print(f"map-to-map piece: max abs error {err:.3g} channels last, {wrong_err:.3g} with the "
          "NCHW tensor passed as it lies")
    assert err < 0.05
    assert wrong_err > 10 * err and wrong_err > 0.1


RUN_COPY = r"""
import json, sys
import numpy as np
from splitc.runtime.fpga import FpgaPieces
x = np.load(sys.argv[2])
print(json.dumps(FpgaPieces(sys.argv[1]).run("p0", x, (1, 5, 2, 3)).tolist()))
"""


def test_a_copied_device_folder_runs_without_the_hls_project(map_piece, tmp_path):
    """The C simulation reads its weights from the folder it is in (hls4ml's own build read
    them from the compile's absolute path, and exits the process when they are gone)."""
    _, folder, _ = map_piece
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("hls", "*.onnx"))
    x = np.random.default_rng(2).uniform(-1, 1, (1, 4, 6, 10)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    here = FpgaPieces(folder).run("p0", x, (1, 5, 2, 3))
    hidden = folder.with_name(folder.name + "-moved")
    folder.rename(hidden)  # the compile's project is gone from where it was built
    try:
        ran = subprocess.run([sys.executable, "-c", RUN_COPY, str(copy), str(tmp_path / "x.npy")],
                             capture_output=True, text=True, timeout=60)
    finally:
        hidden.rename(folder)
    assert ran.returncode == 0, ran.stderr
    assert np.array_equal(np.array(json.loads(ran.stdout)), here)
    (copy / "p0.weights" / next(iter(sorted(p.name for p in (copy / "p0.weights").iterdir())))
     ).write_text("0")
    with pytest.raises(PlanError, match="p0.weights does not match its hash"):
        FpgaPieces(copy)


# -- estimates (no hls4ml build) ----------------------------------------------------------

class ConvDense(torch.nn.Module):
    """conv 3x3 (2 -> 4, padding 1) on 6x6, ReLU, flatten, dense 144 -> 3."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.fc = torch.nn.Linear(144, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def conv_dense(tmp_path_factory):
    torch.manual_seed(0)
    func, _ = relax_main(ConvDense(), (1, 2, 6, 6), tmp_path_factory.mktemp("cd") / "cd.onnx")
    return piece_graph(func, None, "p")


def test_reuse_factors_are_the_ones_hls4ml_accepts():
    from splitc import optional

    backend = optional.hls4ml().backends.get_backend("Vivado")
    for n_in, n_out in [(18, 4), (144, 3), (72, 16), (9, 6), (256, 10), (576, 64)]:
        assert valid_reuse_factors(n_in, n_out) == backend.get_valid_reuse_factors(n_in, n_out)


def test_the_estimate_is_the_stated_model(conv_dense):
    fabric = Fabric.of(FABRIC)
    conv, dense = conv_dense.compute
    est = estimate(conv_dense, fabric, 16, {conv.name: 8, dense.name: 48})
    rows = {row["op"]: row for row in est.layers}
    # conv: 3*3*2*4 = 72 products a pixel over 8 -> 9 multipliers; reads (6+2)^2 padded
    # pixels, one every 8 cycles; dense: 144*3 = 432 over 48 -> 9
    assert (rows["conv2d"]["multipliers"], rows["conv2d"]["cycles"]) == (9, 64 * 8)
    assert (rows["dense"]["multipliers"], rows["dense"]["cycles"]) == (9, 48 + 8 + 4)
    assert (est.multipliers, est.dsp, est.lut) == (18, 18, 0)
    assert est.cycles >= max(row["cycles"] for row in est.layers)
    assert est.latency_s == pytest.approx(est.cycles / 100e6 + 1e-4)
    narrow = estimate(conv_dense, fabric, 8, {conv.name: 8, dense.name: 48})
    assert (narrow.dsp, narrow.lut) == (0, 18 * 64)  # under 10 bits: multipliers in LUTs
    wide = estimate(conv_dense, fabric, 24, {conv.name: 1, dense.name: 1})
    assert wide.dsp == 2 * (72 + 432) and not wide.fits  # a DSP48 multiplies 25x18


def test_the_reuse_factors_chosen_are_the_fastest_that_fit(conv_dense):
    """Against a brute force over every valid pair, on a part with 40 DSP slices."""
    fabric = Fabric.of(FABRIC)
    small = Fabric(fabric.part, fabric.clock_mhz, 40, fabric.bram36, fabric.lut,
                   fabric.call_overhead_s, fabric.dma_bytes_per_second)
    conv, dense = conv_dense.compute
    chosen, est = choose_reuse(conv_dense, small, 16)
    assert est.fits and est.dsp <= 40

    def interval(e):
        return max(row["cycles"] for row in e.layers if row["op"] in ("conv2d", "dense"))

    best = min(interval(e) for rc, rd in itertools.product(
        valid_reuse_factors(*conv.mult_size), valid_reuse_factors(*dense.mult_size))
        for e in [estimate(conv_dense, small, 16, {conv.name: rc, dense.name: rd})] if e.fits)
    assert interval(est) == best
    assert chosen[conv.name] > 1  # 504 multipliers do not fit 40 slices


def test_a_piece_too_big_for_the_part_is_refused_with_the_numbers(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1))
    func, weights = relax_main(model, (1, 32, 32, 32), tmp_path / "big.onnx")
    priced = price(func, weights, "p0", FABRIC, FpgaOptions())
    assert not priced.estimate.fits
    with pytest.raises(SplitcError, match=r"p0 does not fit xc7z020clg400-1 \(pynq-z1-fpga\), "
                                          r"estimated: \d+ DSP slices of 220, \d+ 36 Kb block "
                                          r"RAMs of 140 .*Raise --fpga-reuse"):
        build_piece("p0", priced, FABRIC, FpgaOptions(), tmp_path, lambda _m: None)
    assert not (tmp_path / "hls").exists()  # refused before hls4ml wrote anything


class ConvSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.softmax(self.b(torch.relu(self.a(x))), dim=1)


def test_an_op_the_fabric_has_no_layer_for_is_refused_naming_it(tmp_path):
    path = export(ConvSoftmax(), (1, 3, 16, 16), tmp_path / "softmax.onnx")
    with pytest.raises(SplitcError, match=r"FPGA piece dev1_p0: \w+ is nn\.softmax, which the "
                                          r"hls4ml path does not take"):
        compile_model(str(path), tmp_path / "out", ["host", "pynq-z1-fpga"], "pipeline")
    # hls4ml's streaming pooling asserts (aborting the process) on windows that overlap, and
    # a max pooling's padding is zeros only where its input cannot be negative
    overlapping = (torch.nn.MaxPool2d(3, 2, padding=1), r"3x3 with stride 2x2 .*stride = size")
    padded = (torch.nn.MaxPool2d(2, 2, padding=1), "with padding of a tensor that may be negative")
    for pool, why in [overlapping, padded]:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), pool)
        func, _ = relax_main(model, (1, 3, 16, 16), tmp_path / "pool.onnx")
        with pytest.raises(SplitcError, match=r"\w+ is nn\.max_pool2d " + why):
            piece_graph(func, None, "p0")


# -- auto ---------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Conv2d(c, c, 3, padding=1)
        self.b = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """conv 1 -> 24 on 12x12, two residual blocks, max pooling, dense: 6 MFLOP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.ReLU(),
                                Block(24), Block(24), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(24 * 6 * 6, 10))
    return export(model, (1, 1, 12, 12), tmp_path_factory.mktemp("auto") / "cnn.onnx")


def fabric_pieces(result):
    best = result.best
    return [p for p in best.plan.pieces if p.name in best.priced
            and best.priced[p.name].seconds is not None]


def test_auto_puts_a_cnn_segment_on_the_fabric_when_its_estimates_pay(small_cnn):
    # a Pi 3 beside the fabric: its CPU is slow enough that moving convolutions to the
    # fabric pays for the messages (each costs the runtime's CPU on both boards; beside a
    # Pi 4 the 6 MFLOP model is too small for it to pay)
    cluster = Cluster.uniform(["rpi3", "pynq-z1-fpga"])
    mod = frontend.load(str(small_cnn)).mod
    result = search(mod, cluster, cluster_speeds(cluster), objective="throughput")
    on_fabric = fabric_pieces(result)
    assert on_fabric, result.explain(cluster)
    (piece,) = on_fabric
    assert "conv2d" in result.best.priced[piece.name].note
    assert [d.target for d in result.best.plan.devices] == ["rpi3", "pynq-z1-fpga"]
    without = min((c for c in result.candidates if c.fits and not any(
        p.seconds is not None for p in c.priced.values())), key=lambda c: c.estimate.period)
    assert result.best.estimate.period < without.estimate.period

    said = subprocess.run([sys.executable, "-m", "splitc.cli", "plan", str(small_cnn),
                           "--devices", "rpi3,pynq-z1-fpga", "--objective", "throughput",
                           "--explain"], capture_output=True, text=True, timeout=300)
    assert said.returncode == 0, said.stderr
    text = said.stdout
    assert f"{piece.name} on dev1 (pynq-z1-fpga): " in text and "DSP" in text
    assert "(estimate)" in text and "the fabric pays: " in text
    assert f"the best plan without it, {without.label}" in text


def test_auto_keeps_work_off_the_fabric_when_its_estimates_do_not_pay(small_cnn):
    cluster = Cluster.uniform(["rpi4", "pynq-z1-fpga"])
    mod = frontend.load(str(small_cnn)).mod
    result = search(mod, cluster, cluster_speeds(cluster), objective="latency")
    assert not fabric_pieces(result)
    text = result.explain(cluster)
    assert "nothing goes to the fabric: the best candidate using it, " in text
    # ... and the pieces the fabric was offered were priced, not refused
    assert any(p.seconds for c in result.candidates for p in c.priced.values())
