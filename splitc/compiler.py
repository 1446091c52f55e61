"""``splitc compile``: model → Relax → split passes → one TVM artifact folder per device.

The stages, each in its own module: :mod:`splitc.importer` (ONNX / torch.export → Relax),
a split strategy from :mod:`splitc.passes` (plan, then rewrite into per-device pieces),
:mod:`splitc.passes.extract` (one IRModule per device and the transfers), then a TVM build per
device for its target (:mod:`splitc.targets`) and the plan written as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm

import splitc
from splitc import importer
from splitc import targets as target_registry
from splitc.build import build
from splitc.cluster import Cluster
from splitc.errors import SplitcError
from splitc.passes.channel_split import ChannelSplit, plan_channel
from splitc.passes.extract import Extracted, extract
from splitc.passes.pipeline_split import PipelineSplit, plan_pipeline
from splitc.passes.spatial_split import SpatialSplit, plan_spatial
from splitc.runtime.plan import (
    Device,
    Endpoint,
    Piece,
    Plan,
    Slice,
    Tensor,
    Transfer,
    sha256_file,
)
from splitc.tuning import database_for

#: strategy name -> (analysis returning a plan value, pass applying it)
STRATEGIES: dict[str, tuple[Callable, type]] = {
    "pipeline": (plan_pipeline, PipelineSplit),
    "channel": (plan_channel, ChannelSplit),
    "spatial": (plan_spatial, SpatialSplit),
}
#: The strategy name that asks the cost-model search to choose (see :mod:`splitc.search`).
AUTO = "auto"
#: The approximate strategy: K nearly independent branches (see :mod:`splitc.passes.branch`),
#: accuracy recovered by ``splitc finetune``.
BRANCH = "branch"
#: Where a branch compile records its branch plan (``splitc finetune`` and ``run --check``).
BRANCH_FILE = "branch.json"
#: Trained constants of the branch model, written by ``splitc finetune``.
STUDENT_FILE = "student.npz"
#: Where the compile records how to load the original model again (for ``splitc run --check``).
REFERENCE_FILE = "reference.json"


def split(mod: tvm.IRModule, strategy: str, n_devices: int,
          cluster: Cluster | None = None) -> tvm.IRModule:
    """Plan and apply one strategy: the module in split form.

    When ``cluster`` states a speed for any of its devices (``gflops`` or ``profile``), the
    devices are not alike: the spatial split divides rows in proportion to their speeds and
    the pipeline prices its stages on them, as ``auto``'s candidates do. Otherwise (no speed
    stated) the plan treats the devices as equal and measures nothing."""
    if strategy not in STRATEGIES:
        raise SplitcError(f"unknown strategy {strategy!r}; choose one of "
                          f"{', '.join(STRATEGIES)}")
    planner, apply = STRATEGIES[strategy]
    options = {}
    if cluster is not None and strategy in ("spatial", "pipeline") \
            and any(d.gflops or d.profile for d in cluster.devices):
        from splitc.cost import device_speed
        from splitc.search import row_shares

        speeds = [device_speed(d) for d in cluster.devices]
        options = {"shares": row_shares(speeds)} if strategy == "spatial" else {
            "speeds": speeds, "bytes_per_second": cluster.network.bytes_per_second}
    return apply(planner(mod, n_devices, **options))(mod)


def device_name(index: int) -> str:
    return f"dev{index}"


def build_plan(ex: Extracted, device_targets: list[str], strategy: str, source: str,
               output_names: list[str] | None = None) -> Plan:
    """The plan value for an extracted split (library hashes are filled in after the build).

    ``output_names``: the model's names for its outputs (ONNX output names); default: the
    names of the tensors in the plan.
    """
    names = {i: device_name(i) for i in range(len(device_targets))}
    if not output_names or len(output_names) != len(ex.outputs):
        output_names = [t.name for t in ex.outputs]
    return Plan(
        strategy=strategy,
        devices=tuple(Device(names[i], t, i, names[i]) for i, t in enumerate(device_targets)),
        pieces=tuple(Piece(p.name, names[p.device], p.inputs, p.outputs, p.num_weights,
                           p.flops, p.weight_bytes) for p in ex.pieces),
        tensors={n: Tensor(t.shape, t.dtype) for n, t in ex.all_tensors.items()},
        transfers=tuple(Transfer(t.tensor.name, names[t.src], names[t.dst], t.tensor.nbytes)
                        for t in ex.transfers),
        inputs=tuple(Endpoint(t.name, t.name) for t in ex.inputs),
        outputs=tuple(Endpoint(n, t.name, names[ex.output_device[t.name]])
                      for n, t in zip(output_names, ex.outputs, strict=True)),
        source=source,
        versions={"splitc": splitc.__version__, "tvm": tvm.__version__},
        slices=tuple(Slice(s.tensor.name, s.source, s.axis, s.begin, s.end) for s in ex.slices),
    )


def compile_model(model: str, out_dir: str | Path, devices: list[str] | None = None,
                  strategy: str = "pipeline", *,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, tiny: bool = False,
                  cluster: Cluster | None = None, objective: str = "latency",
                  tuning_db: str | Path | None = None, sync: str | float = "none",
                  calibration: str | Path | None = None, max_accuracy_drop: float = 1.0,
                  epochs: int = 30, fpga=None,
                  log: Callable[[str], None] = lambda _msg: None) -> Plan:
    """Compile ``model`` for ``devices`` (target names) or a ``cluster`` with ``strategy``
    (``auto``: the cost-model search picks it); write ``out_dir``.

    Returns the plan, also written to ``out_dir/plan.json`` and to every device folder.
    ``sync`` (strategy ``branch`` only): which candidate layers stay sync points — ``"all"``,
    ``"none"``, or a weight-mass budget in [0, 1] (see :func:`splitc.passes.branch.choose_sync`).
    ``calibration`` (branch only): training data (see :func:`splitc.finetune.load_data`);
    then the transmission policy is searched instead: the fewest bytes whose distilled
    branch model loses at most ``max_accuracy_drop`` points (``epochs`` of distillation per
    policy tried), and the chosen model's distilled weights are compiled.
    ``fpga``: :class:`splitc.fpga.FpgaOptions` for devices of FPGA targets; their pieces are
    then checked on ``calibration`` (or 256 seeded random inputs) against float.
    """
    if cluster is None:
        check_request(devices or [], strategy)
        cluster = Cluster.uniform(devices)
    elif strategy != AUTO:
        check_request(cluster.targets, strategy)
    imported = importer.load(model, input_shapes, tiny=tiny)
    log(f"imported {imported.source}")
    source = {"model": model, "tiny": tiny,
              "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()},
              "output_names": list(imported.output_names)}
    label = model + (" (tiny)" if tiny else "")
    if strategy == AUTO:
        from splitc.search import search

        result = search(imported.mod, cluster, objective=objective, source=label)
        best = result.best
        log(f"auto: chose {best.label} (predicted latency {best.estimate.latency * 1e3:.2f} ms,"
            f" {best.estimate.transfer_bytes:,} bytes per inference)")
        targets = [cluster.devices[i].target for i in best.devices]
        return write_artifacts(best.extracted, out_dir, targets, best.strategy, source=source,
                               log=log, tuning_db=tuning_db)
    if strategy == BRANCH and calibration is not None:
        from splitc.finetune import load_data, search_policy

        x, y = load_data(calibration)
        check_examples(imported.mod, x, y)
        bplan, student, _trials = search_policy(imported.mod, len(cluster.devices), x, y,
                                                max_drop=max_accuracy_drop, epochs=epochs,
                                                cluster=cluster, log=log)
        plan = compile_branch(imported.mod, out_dir, cluster.targets, None, source=source,
                              log=log, tuning_db=tuning_db, student=student, plan=bplan)
        if student is not None:
            save_student(out_dir, student)
        return plan
    if strategy == BRANCH:
        return compile_branch(imported.mod, out_dir, cluster.targets, sync, source=source,
                              log=log, tuning_db=tuning_db)
    ex = extract(split(imported.mod, strategy, len(cluster.devices), cluster))
    plan = write_artifacts(ex, out_dir, cluster.targets, strategy, source=source, log=log,
                           tuning_db=tuning_db, fpga=fpga)
    if any(target_registry.get(t).is_fpga for t in cluster.targets):
        check_fpga(out_dir, imported, calibration, fpga, log)
    return plan


def check_fpga(out_dir, imported: importer.ImportedModel, calibration, fpga, log) -> None:
    """The FPGA pieces' precision check on calibration data (random inputs if none); a
    refused precision removes the output folder."""
    from splitc.finetune import load_data
    from splitc.fpga import FpgaOptions, check_precision

    opts = fpga or FpgaOptions()
    if calibration is not None:
        x, y = load_data(calibration)
        check_examples(imported.mod, x, y)
        what = str(calibration)
    else:
        shape = tuple(int(d) for d in imported.mod["main"].params[0].ty.shape.values)
        x = np.random.default_rng(0).standard_normal((256, *shape[1:])).astype("float32")
        what = "256 seeded random inputs (give --calibration for real data)"
    log(f"FPGA precision check on {what}")
    try:
        check_precision(out_dir, imported.mod, x, opts.min_agreement, log)
    except SplitcError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def compile_branch(mod: tvm.IRModule, out_dir: str | Path, targets: list[str],
                   sync: str | float | frozenset, *, source: dict,
                   log: Callable[[str], None] = lambda _msg: None,
                   tuning_db: str | Path | None = None, student: tvm.IRModule | None = None,
                   plan=None) -> Plan:
    """Branch-rewrite ``mod`` for ``len(targets)`` devices, channel-split it (branch k on
    device k; transfers only at sync points) and write the artifacts and ``branch.json``.
    ``student``/``plan``: an already rewritten (e.g. distilled) module and its branch plan."""
    from splitc.passes.branch import BranchRewrite, analyse, plan_branches, sync_candidates

    k = len(targets)
    if plan is None:
        ana = analyse(mod, k)
        plan = plan_branches(mod, k, sync, analysis=ana)
        cands = {c.layer: c for c in sync_candidates(ana)}
        kept = sorted(set(cands) - plan.branched)
        log(f"branch: {k} branches; {len(plan.branched)} of {len(cands)} candidate layers cut "
            f"into branches, {len(kept)} kept as sync points"
            + (f" ({', '.join(kept)})" if kept else "")
            + f"; weight mass dropped {sum(cands[c].dropped_mass for c in plan.branched):.2f} "
            f"layer(s)' worth")
    if student is None:
        student = BranchRewrite(plan)(mod)
    ex = extract(split(student, "channel", k))
    result = write_artifacts(ex, out_dir, targets, BRANCH, source=source, log=log,
                             tuning_db=tuning_db)
    (Path(out_dir) / BRANCH_FILE).write_text(plan.to_json())
    return result


def check_examples(mod: tvm.IRModule, x: np.ndarray, y: np.ndarray | None) -> None:
    """Training or calibration examples must fit the model's (first) input."""
    want = tuple(int(d) for d in mod["main"].params[0].ty.shape.values)
    if tuple(x.shape[1:]) != want[1:]:
        raise SplitcError(f"training inputs have shape {list(x.shape[1:])} per example, the "
                          f"model takes {list(want[1:])}")
    if y is not None and len(y) != len(x):
        raise SplitcError(f"{len(x)} inputs but {len(y)} labels")


def save_student(out_dir: str | Path, student) -> None:
    """Keep a branch model's trained constants (a module or a TorchProgram) in the plan
    folder, where ``run --check`` and ``splitc finetune`` find them."""
    from splitc.finetune import TorchProgram

    program = student if isinstance(student, TorchProgram) else TorchProgram(student)
    np.savez(Path(out_dir) / STUDENT_FILE,
             **{k: v.detach().numpy() for k, v in program.weights.items()})


def check_request(devices: list[str], strategy: str) -> None:
    """Refuse an empty device list, an unknown target or strategy before any work."""
    if not devices:
        raise SplitcError("give at least one device (--devices host,host)")
    for d in devices:
        target_registry.get(d)
    if strategy not in STRATEGIES and strategy not in (AUTO, BRANCH):
        raise SplitcError(f"unknown strategy {strategy!r}; choose one of "
                          f"{', '.join([*STRATEGIES, AUTO, BRANCH])}")
    if strategy == BRANCH and len(devices) < 2:
        raise SplitcError("the branch strategy needs at least 2 devices (one per branch)")


def compile_imported(mod: tvm.IRModule, out_dir: str | Path, devices: list[str], strategy: str,
                     *, source: dict, log: Callable[[str], None] = lambda _msg: None) -> Plan:
    """Split an imported module with one exact strategy and write its artifacts."""
    check_request(devices, strategy)
    ex = extract(split(mod, strategy, len(devices)))
    return write_artifacts(ex, out_dir, devices, strategy, source=source, log=log)


def write_artifacts(ex: Extracted, out_dir: str | Path, devices: list[str], strategy: str, *,
                    source: dict, log: Callable[[str], None] = lambda _msg: None,
                    schedules: bool = True, tuning_db: str | Path | None = None,
                    fpga=None) -> Plan:
    """Build every device's piece library for its target and write ``out_dir``.

    ``source`` says how to load the original model again (``{"model", "tiny",
    "input_shapes"}``); it is written to ``out_dir/reference.json`` for ``run --check``.
    """
    specs = [target_registry.get(d) for d in devices]
    databases = {s.name: database_for(s, tuning_db) for s in specs if not s.is_fpga}
    label = source["model"] + (" (tiny)" if source.get("tiny") else "")
    plan = build_plan(ex, devices, strategy, label, source.get("output_names"))

    out = Path(out_dir)
    if out.exists():
        if not (out / "plan.json").exists() and any(out.iterdir()):
            raise SplitcError(f"{out} exists and is not a splitc output folder; "
                              "choose another -o")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    built, pieces = [], {p.name: p for p in plan.pieces}
    for dev, spec in zip(plan.devices, specs, strict=True):
        folder = out / dev.dir
        folder.mkdir()
        module = ex.modules.get(dev.index)
        own = {p.name: ex.weights[p.name] for p in plan.pieces_on(dev.name)}
        if module is None:  # e.g. a spatial split of a model with no row-local layers
            log(f"warning: the {strategy} split gives {dev.name} nothing to do")
            np.savez(folder / dev.weights)
            built.append(Device(dev.name, dev.target, dev.index, dev.dir, "", dev.weights, "",
                                sha256_file(folder / dev.weights)))
            continue
        if spec.is_fpga:
            from splitc import fpga as fpga_path

            log(f"building {dev.name} ({spec.name}): {len(own)} pieces with hls4ml")
            built.append(fpga_path.write_device(dev, spec, module, ex.weights, plan, folder,
                                                fpga or fpga_path.FpgaOptions(), log))
            continue
        log(f"building {dev.name} ({spec.name}): {len(own)} pieces"
            + ("" if schedules else ", plain lowering (no default schedules)"))
        executable, own = build(module, spec.tvm_target(), own, schedules=schedules,
                               log=lambda msg, name=dev.name: log(f"  {name}: {msg}"),
                               tuning_db=databases[spec.name])
        np.savez(folder / dev.weights, **{f"{name}/{i}": w for name, ws in own.items()
                                           for i, w in enumerate(ws)})
        for name, ws in own.items():  # packed weights can differ in number from the originals
            pieces[name] = dataclasses.replace(pieces[name], num_weights=len(ws))
        spec.export_library(executable, folder / dev.lib)
        built.append(Device(dev.name, dev.target, dev.index, dev.dir, dev.lib, dev.weights,
                            sha256_file(folder / dev.lib), sha256_file(folder / dev.weights)))
    plan = dataclasses.replace(plan, pieces=tuple(pieces[p.name] for p in plan.pieces))
    plan = dataclasses.replace(plan, devices=tuple(built))
    plan.save(out / "plan.json")
    for dev in plan.devices:
        plan.save(out / dev.dir / "plan.json")
    (out / REFERENCE_FILE).write_text(json.dumps(source, indent=1))
    return plan


def device_modules(out_dir: str | Path) -> dict[str, tvm.IRModule]:
    """The pieces of a compiled plan as Relax, one module per target (all devices of a target
    merged, so a kernel several pieces share appears once): the model re-imported and split
    again exactly as the compile did."""
    from splitc.passes.branch import BranchPlan, BranchRewrite

    out = Path(out_dir)
    plan = Plan.load(out)
    source = json.loads((out / REFERENCE_FILE).read_text())
    shapes = {k: tuple(v) for k, v in source["input_shapes"].items()} or None
    mod = importer.load(source["model"], shapes, tiny=source["tiny"]).mod
    n = len(plan.devices)
    if plan.strategy == BRANCH:
        student = BranchRewrite(BranchPlan.from_json((out / BRANCH_FILE).read_text()))(mod)
        ex = extract(split(student, "channel", n))
    elif plan.strategy in STRATEGIES:
        ex = extract(split(mod, plan.strategy, n))
    else:
        raise SplitcError(f"cannot re-create the pieces of a {plan.strategy} plan: tune the "
                          "model itself (`splitc tune MODEL`)")
    merged: dict[str, tvm.IRModule] = {}
    for dev in plan.devices:
        module = ex.modules.get(dev.index)
        if module is None:
            continue
        target = merged.setdefault(dev.target, tvm.IRModule())
        for gv, func in module.functions.items():
            target[gv.name_hint] = func
    return merged


def load_reference(out_dir: str | Path):
    """What a compiled plan must compute, to compare the split's answers against: the original
    model, or for a branch plan the branch model (with its distilled weights, if any) —
    anything with ``reference(inputs) -> outputs``."""
    path = Path(out_dir) / REFERENCE_FILE
    if not path.exists():
        raise SplitcError(f"{path} is missing: cannot find the original model to check against")
    source = json.loads(path.read_text())
    shapes = {k: tuple(v) for k, v in source["input_shapes"].items()} or None
    original = importer.load(source["model"], shapes, tiny=source["tiny"])
    if not (Path(out_dir) / BRANCH_FILE).exists():
        return original
    return BranchReference(out_dir, original)


class BranchReference:
    """The branch model of a branch plan, run with torch (:mod:`splitc.finetune`)."""

    def __init__(self, out_dir: str | Path, original: importer.ImportedModel):
        from splitc.passes.branch import BranchPlan, BranchRewrite

        out = Path(out_dir)
        self.plan = BranchPlan.from_json((out / BRANCH_FILE).read_text())
        self.original = original
        self.student_mod = BranchRewrite(self.plan)(original.mod)
        self.trained = out / STUDENT_FILE

    def program(self):
        import torch

        from splitc.finetune import TorchProgram

        program = TorchProgram(self.student_mod)
        if self.trained.exists():
            with np.load(self.trained) as stored:
                program.weights.load_state_dict({k: torch.from_numpy(stored[k])
                                                 for k in stored.files})
        return program

    def reference(self, inputs) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.program().eval()(*[torch.from_numpy(np.asarray(x)) for x in inputs])
        return [o.numpy() for o in out]
