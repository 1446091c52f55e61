"""FPGA targets through hls4ml: a mixed plan (host piece + FPGA piece in bit-accurate C
simulation) over ZeroMQ gives the original's top-1 on real data (scikit-learn's digits); the
error shrinks as the precision grows; pieces that do not fit are refused with the numbers
(convolution pieces, and ops the fabric does not take: ``test_fpga_conv.py``); the generated
project holds what the vendor tools need; the FPGA
worker loads neither TVM nor hls4ml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from splitc import frontend
from splitc.backend.fpga import FpgaOptions, check_precision
from splitc.driver import compile_model
from splitc.errors import SplitcError
from splitc.planning.cluster import Cluster
from splitc.runtime.client import connect
from splitc.runtime.plan import Plan

pytest.importorskip("hls4ml")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """An MLP trained on digits (64 -> 64 -> 32 -> 10), as ONNX; the data as .npz."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("fpga")
    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    y = d.target.astype("int64")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(40):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = folder / "digits_mlp.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 64),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17)
    data = folder / "digits.npz"
    np.savez(data, x=x[:400], y=y[:400])
    return path, data, x[:400], y[:400]


def compile_mixed(model, out, data, precision="ap_fixed<16,6>", reuse=None, agreement=0.99,
                  log=lambda _m: None):
    return compile_model(str(model), out, strategy="pipeline",
                         cluster=Cluster.uniform(["host", "pynq-z1-fpga"]), calibration=data,
                         fpga=FpgaOptions(precision, reuse, agreement), log=log)


def test_mixed_plan_over_zeromq_gives_the_originals_top1(digits_mlp, tmp_path):
    model, data, x, y = digits_mlp
    out = tmp_path / "out"
    said = []
    plan = compile_mixed(model, out, data, log=said.append)
    assert [d.target for d in plan.devices] == ["host", "pynq-z1-fpga"]
    assert any("run " in m and "build.sh" in m for m in said)  # how to build it, printed
    checked = [m for m in said if "max abs error vs float" in m]
    assert checked and "agrees with float on" in checked[0]
    reference = frontend.load(str(model)).reference
    with connect(out, timeout=60) as session:
        got = session.infer_many([[x[i:i + 1]] for i in range(len(x))], inflight=8)
    fpga = np.concatenate([g[0] for g in got])
    want = np.concatenate([reference([x[i:i + 1]])[0] for i in range(len(x))])
    err = float(np.abs(fpga - want).max())
    agree = float((fpga.argmax(-1) == want.argmax(-1)).mean())
    print(f"mixed plan over ZeroMQ, {len(x)} digits: max abs error {err:.4g}, top-1 agreement "
          f"{agree:.4f}, accuracy {(fpga.argmax(-1) == y).mean():.4f} vs "
          f"{(want.argmax(-1) == y).mean():.4f}")
    assert agree == 1.0, (agree, err)
    assert 0 < err < 0.1


def test_error_shrinks_as_precision_grows(digits_mlp, tmp_path):
    model, data, x, _ = digits_mlp
    mod = frontend.load(str(model)).mod
    errors = []
    for i, precision in enumerate(["ap_fixed<10,5>", "ap_fixed<16,6>", "ap_fixed<24,8>"]):
        out = tmp_path / f"p{i}"
        compile_mixed(model, out, data, precision, agreement=0.0)
        (report,) = check_precision(out, mod, x[:200], 0.0, lambda _m: None)
        errors.append(report.max_abs_error)
    assert errors[0] > errors[1] > errors[2] > 0, errors


def test_a_low_precision_is_refused_and_nothing_is_left(digits_mlp, tmp_path):
    model, data, _, _ = digits_mlp
    out = tmp_path / "low"
    with pytest.raises(SplitcError, match=r"precision ap_fixed<6,3> on dev1_p0: top-1 "
                                          r"agreement .* below 99\.0 %; its values reach "
                                          r"[\d.]+ in float, beyond the type's range \+-4; "
                                          r"give a wider --fpga-precision \(e\.g\. "
                                          r"ap_fixed<1\d,[5-9]>\)"):
        compile_mixed(model, out, data, "ap_fixed<6,3>")
    assert not out.exists()


def test_a_piece_that_does_not_fit_is_refused_with_numbers(digits_mlp, tmp_path):
    model, data, _, _ = digits_mlp
    with pytest.raises(SplitcError, match=r"does not fit xc7z020clg400-1 \(pynq-z1-fpga\), "
                                          r"estimated: \d+ DSP slices of 220"):
        compile_mixed(model, tmp_path / "big", data, reuse=1)


def test_the_generated_project_is_what_the_vendor_tools_take(digits_mlp, tmp_path):
    model, data, _, _ = digits_mlp
    out = tmp_path / "out"
    compile_mixed(model, out, data)
    dev = out / "dev1"
    manifest = json.loads((dev / "fpga.json").read_text())
    (piece,) = manifest["pieces"]
    project = dev / manifest["pieces"][piece]["project"]
    for f in (f"firmware/{piece}.cpp", f"firmware/{piece}_axi.cpp", "firmware/parameters.h",
              "build_prj.tcl", "design.tcl", "axi_stream_driver.py", "BUILD.md", "build.sh"):
        assert (project / f).exists(), f
    assert "xc7z020" in (project / "design.tcl").read_text()
    est = manifest["pieces"][piece]["estimate"]
    assert est["label"].startswith("estimate") and est["dsp"] <= est["dsp_available"] == 220


BOARD_CHECK = r"""
import json, sys
import numpy as np
from splitc.runtime.artifact import DeviceArtifact
a = DeviceArtifact(sys.argv[1])
(piece,) = a.pieces.values()
y = a.run(piece, [np.zeros(a.plan.tensors[piece.inputs[0]].shape, "float32")])
print(json.dumps({"shape": list(y[0].shape),
                  "loaded": [m for m in ("tvm", "hls4ml", "torch") if m in sys.modules]}))
"""


def test_the_fpga_worker_loads_neither_tvm_nor_hls4ml(digits_mlp, tmp_path):
    model, data, _, _ = digits_mlp
    out = tmp_path / "out"
    compile_mixed(model, out, data)
    result = subprocess.run([sys.executable, "-c", BOARD_CHECK, str(out / "dev1")], cwd=ROOT,
                            env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"shape": [1, 10], "loaded": []}
    plan = Plan.load(out)
    assert plan.device("dev1").lib == "fpga.json"


def test_cli_compile_and_run_check(digits_mlp, tmp_path):
    model, data, x, _ = digits_mlp
    out = tmp_path / "cli"

    def splitc(*args):
        return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    bad = splitc("compile", model, "--devices", "host,pynq-z1-fpga", "-o", out,
                 "--fpga-precision", "float")
    assert bad.returncode == 2 and "--fpga-precision 'float'" in bad.stderr
    done = splitc("compile", model, "--devices", "host,pynq-z1-fpga", "-o", out,
                  "--calibration", data)
    assert done.returncode == 0, done.stderr
    assert "build.sh" in done.stderr and "estimated" in done.stderr
    np.save(tmp_path / "x.npy", x[:1])
    check = splitc("run", out, "--input", tmp_path / "x.npy", "--check")
    assert check.returncode == 0, check.stderr
    assert "the top-1 is the original's" in check.stdout


def test_cost_model_entry_for_the_fabric(digits_mlp):
    from splitc import targets
    from splitc.backend.hls_graph import Fabric, estimate, piece_graph
    from splitc.passes.ir import lift_weights
    from splitc.planning.cluster import ClusterDevice
    from splitc.planning.cost import device_speed

    speed = device_speed(ClusterDevice("f", "pynq-z1-fpga", 1e6))
    assert speed.flops_per_second == 44e9 and "FPGA estimate" in speed.source
    model, *_ = digits_mlp
    func, weights = lift_weights(frontend.load(str(model)).mod["main"])
    graph = piece_graph(func, weights, "p")
    assert graph.io_type == "io_parallel"  # dense layers alone: no streams
    fabric = Fabric.of(targets.get("pynq-z1-fpga"))
    names = [layer.name for layer in graph.compute]
    est = estimate(graph, fabric, 16, dict(zip(names, [16, 8, 4], strict=True)))
    # 64x64/16 + 64x32/8 + 32x10/4 multipliers; reuse + adder tree + 4 cycles a layer, one
    # after the other; the DMA of 64 floats in and 10 out at 1.2 GB/s; the call's overhead
    assert (est.multipliers, est.dsp) == (256 + 256 + 80, 592) and not est.fits
    assert est.cycles == (16 + 6 + 4) + (8 + 6 + 4) + (4 + 5 + 4)
    assert est.latency_s == pytest.approx(est.cycles / 100e6 + 74 * 4 / 1.2e9 + 1e-4)
    narrow = estimate(graph, fabric, 8, dict(zip(names, [16, 8, 4], strict=True)))
    assert narrow.dsp == 0  # under 10 bits the multipliers go to LUTs
