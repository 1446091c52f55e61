"""Compiled plans for runtime tests, built straight from a small Relax module.

:func:`write_out` does what ``splitc.driver.write_artifacts`` does (split, extract, build the
plan, ``tvm.compile`` each device's module for the host, write ``OUT/devN/{lib.so,
weights.npz,plan.json}`` with their hashes and ``OUT/plan.json``), without the importer or the
target registry, so the runtime tests need neither ONNX nor torch.

The model (:func:`two_in_two_out`) has two inputs and two outputs, so routing of model inputs
to only the devices that read them and of outputs back to the client is exercised::

    a = conv3x3(x)            # x: 1x3x8x8 -> 1x8x8x8
    b = relu(a + y)           # y: 1x8x8x8
    d = relu(conv1x1(b))      # output 2
    e = conv3x3(d)            # output 1: 1x6x8x8
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from splitc.passes.split.channel import ChannelSplit, plan_channel
from splitc.passes.split.pipeline import PipelineSplit, plan_pipeline
from splitc.passes.split.spatial import SpatialSplit, plan_spatial, plan_spatial_stages
from splitc.planning.extract import extract
from splitc.runtime.plan import Device, Plan, sha256_file

HOST = tvm.target.Target({"kind": "llvm"})
_RNG = np.random.default_rng(0)
W1 = (_RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype("float32")
W2 = (_RNG.standard_normal((8, 8, 1, 1)) * 0.3).astype("float32")
W3 = (_RNG.standard_normal((6, 8, 3, 3)) * 0.3).astype("float32")
SPLITS = {"pipeline": (plan_pipeline, PipelineSplit), "channel": (plan_channel, ChannelSplit),
          "spatial": (plan_spatial, SpatialSplit),
          # two tiled stages on two device groups (a pipeline of spatial splits)
          "stages": (lambda mod, n: plan_spatial_stages(mod, n, 2, max_overhead=1.0),
                     SpatialSplit)}


def two_in_two_out() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    y = relax.Var("y", relax.TensorType((1, 8, 8, 8), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1), padding=1), name_hint="a")
            b = bb.emit(relax.op.nn.relu(relax.op.add(a, y)), name_hint="b")
            c = bb.emit(relax.op.nn.conv2d(b, relax.const(W2)), name_hint="c")
            d = bb.emit_output(relax.op.nn.relu(c), name_hint="d")
            e = bb.emit_output(relax.op.nn.conv2d(d, relax.const(W3), padding=1),
                               name_hint="e")
        bb.emit_func_output(relax.Tuple([e, d]))
    return bb.get()


def random_inputs(plan: Plan, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(plan.tensors[e.tensor].shape).astype(plan.tensors[e.tensor].dtype)
            for e in plan.inputs]


def reference(*inputs: np.ndarray) -> list[np.ndarray]:
    """The unsplit model's outputs, compiled and run here."""
    vm = relax.VirtualMachine(tvm.compile(two_in_two_out(), HOST), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return [out[i].numpy() for i in range(len(out))]


def write_out(out: str | Path, strategy: str = "pipeline", n_devices: int = 2,
              mod: tvm.IRModule | None = None) -> Plan:
    """Split ``mod`` (default :func:`two_in_two_out`) and write a full OUT folder."""
    mod = mod if mod is not None else two_in_two_out()
    planner, apply = SPLITS[strategy]
    ex = extract(apply(planner(mod, n_devices))(mod))
    plan = ex.plan(["host"] * n_devices, strategy, f"runtime-test-{strategy}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built = []
    for dev in plan.devices:
        folder = out / dev.dir
        folder.mkdir(exist_ok=True)
        np.savez(folder / dev.weights, **{f"{p.name}/{i}": w
                                          for p in plan.pieces_on(dev.name)
                                          for i, w in enumerate(ex.weights[p.name])})
        tvm.compile(ex.modules[dev.name], HOST).export_library(str(folder / dev.lib))
        built.append(dataclasses.replace(dev, lib_sha256=sha256_file(folder / dev.lib),
                                         weights_sha256=sha256_file(folder / dev.weights)))
    return save_plan(out, dataclasses.replace(plan, devices=tuple(built)))


def save_plan(out: Path, plan: Plan) -> Plan:
    plan.save(out / "plan.json")
    for dev in plan.devices:
        plan.save(out / dev.dir / "plan.json")
    return plan


def break_device(out: Path, device: str) -> Plan:
    """Give ``device`` a wrong-shaped first weight (hashes updated, so it loads): running its
    first piece then fails inside TVM. Returns the rewritten plan."""
    plan = Plan.load(out)
    dev = plan.device(device)
    weights_path = out / dev.dir / dev.weights
    with np.load(weights_path) as stored:
        weights = dict(stored)
    first = plan.pieces_on(device)[0].name
    weights[f"{first}/0"] = np.zeros((1, 1, 1, 1), "float32")
    np.savez(weights_path, **weights)
    devices = tuple(dataclasses.replace(d, weights_sha256=sha256_file(weights_path))
                    if d.name == device else d for d in plan.devices)
    return save_plan(out, dataclasses.replace(plan, devices=devices))


__all__ = ["Device", "break_device", "random_inputs", "reference", "two_in_two_out",
           "write_out"]
