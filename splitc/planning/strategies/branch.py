"""``branch`` (approximate): K nearly independent branches, one per device, exchanging
activations only at a few sync points (:mod:`splitc.passes.split.branch`); the branch model is
then channel-split, branch k on device k, and distilled from the original
(:mod:`splitc.planning.distill`, ``splitc finetune``) to recover its accuracy.

Options (``Context.options``): ``sync`` — ``"all"`` (exact), ``"none"`` (fewest bytes), or a
weight-mass budget in [0, 1]; ``calibration`` — training data: the transmission policy is then
searched instead (policies priced by the cost model and tried from the lowest predicted latency
up, each distilled and measured on a held-out fifth; the first within ``max_accuracy_drop``
points is compiled with its distilled weights), ``epochs`` of distillation per policy tried.

The output folder keeps the branch plan (``branch.json``) and the trained constants
(``student.npz``), from which ``run --check`` rebuilds the branch model as its reference (built
with TVM, so the check never depends on which ops the torch interpreter knows) and
``splitc tune OUT`` the split.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from splitc.backend.torch_program import TorchProgram, check_trainable
from splitc.errors import SplitcError
from splitc.frontend.data import check_examples, load_data
from splitc.passes.ir import rebuild_main, substitute
from splitc.passes.split.branch import (
    BranchPlan,
    BranchRewrite,
    BranchSplit,
    analyse,
    branch_devices,
    channel_axes,
    keep_where_cuts_hurt,
    plan_branches,
    sync_candidates,
)
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, estimate
from splitc.planning.distill import Report, cut_losses, distill
from splitc.planning.extract import extract
from splitc.planning.registry import Context, Split, Strategy, register

#: Where a branch compile records its branch plan (``splitc finetune`` and ``run --check``).
BRANCH_FILE = "branch.json"
#: Trained constants of the branch model, written by the policy search and ``splitc finetune``.
STUDENT_FILE = "student.npz"


def branch_split(original: tvm.IRModule, plan: BranchPlan,
                 student: tvm.IRModule | None = None) -> tvm.IRModule:
    """The branch model (``student``: trained, else the plan's rewrite of ``original``) in
    split form, branch k on device k (its sync points become transfers)."""
    if student is None:
        student = BranchRewrite(plan)(original)
    return BranchSplit(branch_devices(original, plan))(student)


def student_file(student: TorchProgram | tvm.IRModule) -> bytes:
    """A branch model's trained constants, as ``student.npz``."""
    program = student if isinstance(student, TorchProgram) else TorchProgram(student)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.detach().cpu().numpy() for k, v in program.weights.items()})
    return buffer.getvalue()


@register
class Branch(Strategy):
    name = "branch"
    summary = ("approximate: one branch per device, exchanging at a few sync points; "
               "recover accuracy with `splitc finetune`")
    exact = False
    min_devices = 2

    def needs_speeds(self, options) -> bool:
        return options.get("calibration") is not None  # the policies are priced

    def plan(self, mod, ctx: Context) -> BranchPlan:
        k = ctx.n_devices
        ana = analyse(mod, k)
        plan = plan_branches(mod, k, ctx.options.get("sync", "none"), analysis=ana)
        cands = {c.layer: c for c in sync_candidates(ana)}
        kept = sorted(set(cands) - plan.branched)
        ctx.log(f"branch: {k} branches; {len(plan.branched)} of {len(cands)} candidate layers "
                f"cut into branches, {len(kept)} kept as sync points"
                + (f" ({', '.join(kept)})" if kept else "")
                + f"; weight mass dropped "
                f"{sum(cands[c].dropped_mass for c in plan.branched):.2f} layer(s)' worth")
        return plan

    def rewrite(self, plan: BranchPlan) -> Callable[[tvm.IRModule], tvm.IRModule]:
        return lambda mod: branch_split(mod, plan)

    def split(self, mod, ctx: Context) -> Split:
        calibration = ctx.options.get("calibration")
        if calibration is None:
            plan = self.plan(mod, ctx)
            return self.trained(mod, plan, BranchRewrite(plan)(mod))
        x, y = load_data(calibration)
        check_examples(mod, x, y)
        check_trainable(mod)
        plan, student, _trials = search_policy(
            mod, ctx.n_devices, x, y, max_drop=ctx.options.get("max_accuracy_drop", 1.0),
            epochs=ctx.options.get("epochs", 30), cluster=ctx.cluster, speeds=ctx.speeds,
            log=ctx.log)
        return self.trained(mod, plan,
                            student if student is not None else BranchRewrite(plan)(mod),
                            keep_weights=student is not None)

    def trained(self, original: tvm.IRModule, plan: BranchPlan,
                student: tvm.IRModule | TorchProgram, keep_weights: bool = True) -> Split:
        """The split of a branch model of ``original`` (``student``: rewritten, and perhaps
        distilled), with its plan and (``keep_weights``) its trained constants kept in the
        output folder."""
        module = student.to_module() if isinstance(student, TorchProgram) else student
        files: dict[str, str | bytes] = {BRANCH_FILE: plan.to_json()}
        if keep_weights:
            files[STUDENT_FILE] = student_file(student)
        return Split(branch_split(original, plan, module), files)

    def recreate(self, mod, n_devices, out_dir):
        plan = BranchPlan.from_json((Path(out_dir) / BRANCH_FILE).read_text())
        return self.rewrite(plan)(mod)

    def reference(self, out_dir, original):
        return BranchReference(out_dir, original)


class BranchReference:
    """The branch model of a branch plan (with its distilled weights, if any): what the plan's
    answers are checked against. :meth:`reference` builds it with TVM for this CPU (so the
    check does not depend on the torch interpreter); :meth:`program` is the trainable torch
    view (``splitc finetune``)."""

    def __init__(self, out_dir: str | Path, original):
        out = Path(out_dir)
        try:
            text = (out / BRANCH_FILE).read_text()
        except FileNotFoundError:
            raise SplitcError(f"{out / BRANCH_FILE} is missing: compile with --strategy "
                              "branch again") from None
        self.plan = BranchPlan.from_json(text)
        self.original = original
        self.student_mod = BranchRewrite(self.plan)(original.mod)
        self.trained = out / STUDENT_FILE

    def stored(self) -> dict[str, np.ndarray]:
        """The distilled constants (``student.npz``), by parameter name; {} before
        ``splitc finetune``."""
        if not self.trained.exists():
            return {}
        with np.load(self.trained) as stored:
            return {k: stored[k] for k in stored.files}

    def program(self) -> TorchProgram:
        program = TorchProgram(self.student_mod)
        stored = self.stored()
        if stored:
            program.weights.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()})
        return program

    def module(self) -> tvm.IRModule:
        """The branch model with its distilled constants, as Relax."""
        return with_constants(self.student_mod, self.stored())

    def reference(self, inputs) -> list[np.ndarray]:
        ex = tvm.compile(self.module(), tvm.target.Target({"kind": "llvm"}))
        out = relax.VirtualMachine(ex, tvm.cpu())["main"](
            *[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
        outs = out if isinstance(out, tvm.ir.Array | list | tuple) else [out]
        return [o.numpy() for o in outs]


def with_constants(mod: tvm.IRModule, arrays: dict[str, np.ndarray]) -> tvm.IRModule:
    """``mod`` with the constants named in ``arrays`` (``{binding}__{argument index}``, as
    :class:`~splitc.backend.torch_program.TorchProgram` names its parameters) replaced."""
    if not arrays:
        return mod

    def rewrite(b, vmap):
        call = b.value
        if not isinstance(call, relax.Call):
            return substitute(call, vmap)
        args = []
        for i, a in enumerate(call.args):
            key = f"{b.var.name}__{i}"
            if isinstance(a, tvm.ir.GenericConst) and key in arrays:
                value = np.asarray(arrays[key])
                if value.shape != tuple(int(d) for d in a.ty.shape.values):
                    raise SplitcError(f"{STUDENT_FILE}: {key} has shape {list(value.shape)}, "
                                      "the branch model another: compile again")
                a = relax.const(value.astype(str(a.ty.dtype)))
            else:
                a = substitute(a, vmap)
            args.append(a)
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    return rebuild_main(mod, rewrite)


# -- transmission-policy search ------------------------------------------------------------
@dataclass
class PolicyTrial:
    label: str
    sync: list[str]          # candidate layers kept as sync points
    gather_bytes: int        # estimated bytes per inference at those sync points
    latency: float | None    # the cost model's predicted latency on the cluster (s)
    report: Report | None    # None: exact (nothing cut, nothing to train)


def search_policy(mod: tvm.IRModule, k: int, x: np.ndarray, y: np.ndarray | None, *,
                  max_drop: float, epochs: int = 30, budgets=(0.1, 0.25, 0.5, 0.75),
                  cluster: Cluster | None = None, speeds=None,
                  log: Callable[[str], None] = print):
    """The cheapest transmission policy whose *distilled* branch model stays within
    ``max_drop`` points of the original on held-out calibration data.

    The channels are partitioned with the weights and the co-firing of activations on ``x``.
    Candidate policies: no sync point, the mass budgets of
    :func:`~splitc.passes.split.branch.choose_sync`, for each of those the sync points within
    the same bytes where cutting hurts most as measured by refitting the cut layers
    (:func:`~splitc.passes.split.branch.keep_where_cuts_hurt`), every sync point (exact,
    always within). With
    a ``cluster`` each is priced by the cost model (:func:`splitc.planning.cost.estimate` on its
    extracted plan) and tried from the lowest predicted latency up, else from the fewest
    bytes up. Each is distilled on ``x`` (``y``: labels, optional) and measured. Returns
    ``(plan, trained student module or None, trials)``."""
    teacher = TorchProgram(mod)
    ana = analyse(mod, k, samples=teacher.channel_samples(x, channel_axes(mod, k), limit=256))
    cost = {c.layer: c.gather_bytes for c in sync_candidates(ana)}
    loss = cut_losses(teacher, mod, plan_branches(mod, k, "none", analysis=ana), x)
    mass = [(f"mass budget {b}", plan_branches(mod, k, b, analysis=ana)) for b in budgets]
    guided = []
    for b, (_, plan) in zip(budgets, mass, strict=True):
        limit = sum(cost[c] for c in set(cost) - plan.branched)
        guided.append((f"where cuts hurt, {limit:,} bytes (as mass budget {b})",
                       keep_where_cuts_hurt(ana, loss, limit)))
    seen, policies = set(), []
    for label, sync in [("no sync", "none"), *mass, *guided, ("every sync kept", "all")]:
        plan = sync if isinstance(sync, BranchPlan) else plan_branches(mod, k, sync,
                                                                        analysis=ana)
        if plan.branched in seen:
            continue
        seen.add(plan.branched)
        kept = sorted(set(cost) - plan.branched)
        latency = predicted_latency(mod, plan, cluster, speeds) if cluster else None
        policies.append((latency or 0.0, sum(cost[c] for c in kept), label, plan, kept))
    policies.sort(key=lambda p: (p[0], p[1]))
    trials = []
    for latency, nbytes, label, plan, kept in policies:
        priced = f", predicted {latency * 1e3:.2f} ms" if cluster else ""
        if not plan.branched:
            trials.append(PolicyTrial(label, kept, nbytes, latency if cluster else None, None))
            log(f"policy {label}: exact, {nbytes:,} bytes at sync points{priced}")
            return plan, None, trials
        student = TorchProgram(BranchRewrite(plan)(mod))
        report = distill(teacher, student, x, y, epochs=epochs, log=lambda _m: None,
                         plan=plan)
        drop = (report.teacher - report.after) * 100
        trials.append(PolicyTrial(label, kept, nbytes, latency if cluster else None, report))
        log(f"policy {label}: {len(plan.branched)} layers cut, {nbytes:,} bytes at sync "
            f"points{priced}; {report.metric} {report.teacher:.4f} -> {report.after:.4f} "
            f"after distillation (drop {drop:.2f} points, limit {max_drop})")
        if drop <= max_drop:
            return plan, student.to_module(), trials
    raise AssertionError("unreachable: the exact policy is always within")


def branch_bytes(original: tvm.IRModule, k: int, sync: str | float = "none") -> int:
    """Bytes the devices of a ``k``-branch plan of ``original`` send each other per inference
    (``sync`` as for :func:`~splitc.passes.split.branch.plan_branches`)."""
    return extract(branch_split(original, plan_branches(original, k, sync))).transfer_bytes


def predicted_latency(original: tvm.IRModule, plan: BranchPlan, cluster: Cluster,
                      speeds: list[DeviceSpeed] | None) -> float:
    """The cost model's latency for a branch plan split over ``cluster`` (branch k on
    device k)."""
    ex = extract(branch_split(original, plan), [d.name for d in cluster.devices])
    return estimate(ex.plan(cluster.targets, "branch", "policy"), cluster, speeds).latency
