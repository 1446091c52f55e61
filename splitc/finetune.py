"""Distillation for branch plans: train a Relax module's constants with torch.

:class:`TorchProgram` evaluates ``main`` of a Relax module with torch operators, its tensor
constants turned into parameters — one implementation of each operator, so the teacher (the
original module) and the student (its branch rewrite) run the same code. :func:`distill`
trains the student to match the teacher's softened outputs (and the labels, when given), on
a GPU when one is present. :meth:`TorchProgram.to_module` writes the trained constants back
into the Relax module, which the compiler then splits and builds as before.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.ir import (
    main_block,
    op_name,
    output_vars,
    rebuild_main,
    static_shape,
    substitute,
)


def _pads(padding) -> tuple[int, int, int, int]:
    p = [int(v) for v in padding]
    if len(p) == 2:
        p = p + p
    return p[0], p[1], p[2], p[3]  # top, left, bottom, right


def _conv2d(x, w, a):
    top, left, bottom, right = _pads(a.padding)
    pad = (top, left)
    if (top, left) != (bottom, right):
        x, pad = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.conv2d(x, w, stride=[int(s) for s in a.strides], padding=pad,
                    dilation=[int(d) for d in a.dilation], groups=int(a.groups))


def _pool(kind):
    def run(x, a):
        top, left, bottom, right = _pads(a.padding)
        k, s = [int(v) for v in a.pool_size], [int(v) for v in a.strides]
        if kind == "max":
            x = F.pad(x, (left, right, top, bottom), value=-math.inf)
            return F.max_pool2d(x, k, s, dilation=[int(d) for d in a.dilation],
                                ceil_mode=bool(a.ceil_mode))
        if (top, left) == (bottom, right):
            return F.avg_pool2d(x, k, s, padding=(top, left), ceil_mode=bool(a.ceil_mode),
                                count_include_pad=bool(a.count_include_pad))
        raise SplitcError("avg_pool2d with asymmetric padding is not supported for training")
    return run


def _axes(a, rank):
    return [int(v) % rank for v in a.axis] if a.axis is not None else list(range(rank))


#: op name -> f(args, attrs, out_shape) (args are tensors or Python values)
OPS: dict[str, Callable] = {
    "nn.conv2d": lambda args, a, _s: _conv2d(args[0], args[1], a),
    "add": lambda args, a, _s: args[0] + args[1],
    "subtract": lambda args, a, _s: args[0] - args[1],
    "multiply": lambda args, a, _s: args[0] * args[1],
    "divide": lambda args, a, _s: args[0] / args[1],
    "maximum": lambda args, a, _s: torch.maximum(args[0], args[1]),
    "minimum": lambda args, a, _s: torch.minimum(args[0], args[1]),
    "nn.relu": lambda args, a, _s: F.relu(args[0]),
    "nn.relu6": lambda args, a, _s: F.relu6(args[0]),
    "sigmoid": lambda args, a, _s: torch.sigmoid(args[0]),
    "tanh": lambda args, a, _s: torch.tanh(args[0]),
    "nn.silu": lambda args, a, _s: F.silu(args[0]),
    "nn.gelu": lambda args, a, _s: F.gelu(args[0]),
    "clip": lambda args, a, _s: torch.clamp(args[0], float(args[1]), float(args[2])),
    "nn.dropout": lambda args, a, _s: args[0],
    "nn.max_pool2d": lambda args, a, _s: _pool("max")(args[0], a),
    "nn.avg_pool2d": lambda args, a, _s: _pool("avg")(args[0], a),
    "nn.adaptive_avg_pool2d": lambda args, a, _s: F.adaptive_avg_pool2d(
        args[0], [int(v) for v in a.output_size] if a.output_size is not None else 1),
    "mean": lambda args, a, _s: args[0].mean(dim=_axes(a, args[0].dim()),
                                            keepdim=bool(a.keepdims)),
    "sum": lambda args, a, _s: args[0].sum(dim=_axes(a, args[0].dim()),
                                          keepdim=bool(a.keepdims)),
    # the batch axis follows the data (the module was imported for batch 1)
    "reshape": lambda args, a, s: args[0].reshape(args[0].shape[0], *s[1:]),
    "flatten": lambda args, a, s: args[0].reshape(args[0].shape[0], *s[1:]),
    "matmul": lambda args, a, _s: args[0] @ args[1],
    "permute_dims": lambda args, a, _s: args[0].permute(*[int(v) for v in a.axes]),
    "concat": lambda args, a, _s: torch.cat(list(args[0]), dim=int(a.axis)),
    "nn.softmax": lambda args, a, _s: F.softmax(args[0], dim=int(a.axis)),
}


class TorchProgram(torch.nn.Module):
    """``main`` of a Relax module as a torch module; constants are parameters.

    Parameters
    ----------
    mod : IRModule
        A module with a single dataflow block in ``main`` (what the importer produces).
    """

    def __init__(self, mod: tvm.IRModule):
        super().__init__()
        self.mod = mod
        func = mod["main"]
        self.inputs = [p.name for p in func.params]
        self.outputs = [v.name for v in output_vars(func)]
        self.steps = []
        params = {}
        for b in main_block(mod).bindings:
            call = b.value
            name = op_name(call)
            if name not in OPS:
                raise SplitcError(f"`splitc finetune` cannot train through {name} (binding "
                                  f"{b.var.name}); supported: {', '.join(sorted(OPS))}")
            args = []
            for i, a in enumerate(call.args):
                if isinstance(a, relax.Var):
                    args.append(("var", a.name))
                elif isinstance(a, relax.Tuple):
                    args.append(("tuple", [f.name for f in a.fields]))
                elif isinstance(a, tvm.ir.GenericConst):
                    key = f"{b.var.name}__{i}"
                    value = torch.from_numpy(a.value.numpy().copy())
                    params[key] = torch.nn.Parameter(value, requires_grad=value.is_floating_point()
                                                     and value.dim() > 0)
                    args.append(("param", key))
                elif isinstance(a, relax.ShapeExpr):
                    args.append(("value", None))  # a reshape's target: the static shape
                elif isinstance(a, tvm.ir.Constant) and hasattr(a, "value") \
                        and isinstance(a.value, int | float):  # a scalar (clip bounds)
                    args.append(("value", float(a.value)))
                else:
                    raise SplitcError(f"`splitc finetune`: unsupported argument {type(a).__name__}"
                                      f" of {name} ({b.var.name})")
            self.steps.append((b.var.name, name, args, call.attrs, static_shape(b.var)))
        self.weights = torch.nn.ParameterDict(params)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env = self.run(*inputs)
        return [env[o] for o in self.outputs]

    def activations(self, x: np.ndarray, limit: int = 256) -> dict[str, np.ndarray]:
        """Every variable's value on (up to ``limit`` of) the examples ``x``."""
        with torch.no_grad():
            env = self.run(torch.from_numpy(np.ascontiguousarray(x[:limit], np.float32)))
        return {k: v.numpy() for k, v in env.items() if isinstance(v, torch.Tensor)}

    def run(self, *inputs: torch.Tensor,
            override: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every variable of ``main``, by name; ``override`` replaces the named variables'
        values as they are computed (to run part of the model elsewhere)."""
        env = dict(zip(self.inputs, inputs, strict=True))
        override = override or {}
        for var, name, args, attrs, shape in self.steps:
            vals = []
            for kind, ref in args:
                if kind == "var":
                    vals.append(env[ref])
                elif kind == "tuple":
                    vals.append([env[r] for r in ref])
                elif kind == "param":
                    vals.append(self.weights[ref])
                else:
                    vals.append(ref)
            env[var] = override[var] if var in override else OPS[name](vals, attrs, shape)
        return env

    def to_module(self) -> tvm.IRModule:
        """The Relax module with this program's (trained) constants."""
        def rewrite(b, vmap):
            args = []
            for i, a in enumerate(b.value.args):
                if isinstance(a, tvm.ir.GenericConst):
                    a = relax.const(self.weights[f"{b.var.name}__{i}"].detach().cpu().numpy()
                                    .astype(str(a.ty.dtype)))
                else:
                    a = substitute(a, vmap)
                args.append(a)
            return relax.Call(b.value.op, args, b.value.attrs, b.value.ty_args)

        return rebuild_main(self.mod, rewrite)


# -- data --------------------------------------------------------------------------------------
def load_data(spec: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Training data: a ``.npz`` (arrays ``x`` and optionally ``y``), a folder of them (or of
    ``.npy`` inputs), or ``module:function`` returning a torch Dataset of ``x`` or ``(x, y)``."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted([*path.glob("*.npz"), *path.glob("*.npy")])
        if not files:
            raise SplitcError(f"{path} holds no .npz or .npy files")
        parts = [load_data(f) for f in files]
        xs = np.concatenate([p[0] for p in parts])
        ys = [p[1] for p in parts]
        return xs, (np.concatenate(ys) if all(y is not None for y in ys) else None)
    if path.suffix == ".npy" and path.exists():
        return np.load(path, allow_pickle=False), None
    if path.suffix == ".npz" and path.exists():
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d:
                raise SplitcError(f"{path} has no array named x (has: {', '.join(d.files)})")
            return d["x"], (d["y"] if "y" in d else None)
    if ":" in spec and not path.exists():
        module, _, fn = spec.partition(":")
        try:
            dataset = getattr(importlib.import_module(module), fn)()
        except (ImportError, AttributeError) as e:
            raise SplitcError(f"cannot load the dataset factory {spec}: {e}") from None
        items = [dataset[i] for i in range(len(dataset))]
        if isinstance(items[0], tuple | list):
            return (np.stack([np.asarray(i[0]) for i in items]),
                    np.asarray([int(i[1]) for i in items]))
        return np.stack([np.asarray(i) for i in items]), None
    raise SplitcError(f"training data {spec} not found: give a .npz with x (and y), a folder "
                      "of .npz/.npy files, or module:function returning a torch Dataset")


# -- training ----------------------------------------------------------------------------------
@dataclass
class Report:
    """Accuracies (top-1 vs labels, or agreement with the teacher when there are none)."""

    metric: str
    teacher: float
    before: float
    after: float
    epochs: int
    seconds: float
    device: str


def top1(program: torch.nn.Module, x: np.ndarray, device, batch: int = 256) -> np.ndarray:
    program.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch]).to(device)
            out.append(program(xb)[0].argmax(-1).cpu().numpy())
    return np.concatenate(out)


def distill(teacher: TorchProgram, student: TorchProgram, x: np.ndarray,
            y: np.ndarray | None = None, *, epochs: int = 30, lr: float = 2e-3,
            batch: int = 64, temperature: float = 4.0, val_fraction: float = 0.2,
            seed: int = 0, log: Callable[[str], None] = print,
            progress: bool = True) -> Report:
    """Train ``student`` to match ``teacher`` (soft targets at ``temperature``, plus the
    labels ``y`` when given) on ``x``; report held-out accuracy before and after."""
    if len(x) < 10:
        raise SplitcError(f"distillation needs data: got {len(x)} examples")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, int(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    x = x.astype(np.float32, copy=False)
    teacher.to(device).eval()
    student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_val = top1(teacher, x[val], device)
    ref = y[val] if y is not None else t_val
    metric = "top-1 accuracy" if y is not None else "top-1 agreement with the teacher"

    def score(program) -> float:
        return float((top1(program, x[val], device) == ref).mean())

    teacher_score = float((t_val == ref).mean())
    before = score(student)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    xt = torch.from_numpy(x[train]).to(device)
    yt = torch.from_numpy(y[train].astype(np.int64)).to(device) if y is not None else None
    with torch.no_grad():
        soft = torch.cat([teacher(xt[i:i + 256])[0] for i in range(0, len(xt), 256)])
    t0 = time.monotonic()
    steps = math.ceil(len(train) / batch)
    for epoch in range(epochs):
        student.train()
        perm = torch.randperm(len(train), device=device)
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            logits = student(xt[idx])[0]
            loss = F.kl_div(F.log_softmax(logits / temperature, -1),
                            F.softmax(soft[idx] / temperature, -1),
                            reduction="batchmean") * temperature ** 2
            if yt is not None:
                loss = 0.5 * loss + 0.5 * F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        if progress:
            done = (epoch + 1) / epochs
            bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
            print(f"\rdistilling [{bar}] epoch {epoch + 1}/{epochs} loss {total / steps:.4f}",
                  end="" if epoch + 1 < epochs else "\n", file=sys.stderr, flush=True)
    after = score(student)
    student.cpu()
    teacher.cpu()
    report = Report(metric, teacher_score, before, after, epochs, time.monotonic() - t0,
                    str(device))
    log(f"{metric} on {n_val} held-out examples: teacher {teacher_score:.4f}, branch model "
        f"before distillation {before:.4f}, after {after:.4f} ({epochs} epochs, "
        f"{report.seconds:.1f} s on {device})")
    return report


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
                  cluster=None, log: Callable[[str], None] = print):
    """The cheapest transmission policy whose *distilled* branch model stays within
    ``max_drop`` points of the original on held-out calibration data.

    The channels are partitioned with the weights and the co-firing of activations on ``x``.
    Candidate policies: no sync point, the mass budgets of
    :func:`~splitc.passes.branch.choose_sync`, every sync point (exact, always within). With
    a ``cluster`` each is priced by the cost model (:func:`splitc.cost.estimate` on its
    extracted plan) and tried from the lowest predicted latency up, else from the fewest
    bytes up. Each is distilled on ``x`` (``y``: labels, optional) and measured. Returns
    ``(plan, trained student module or None, trials)``."""
    from splitc.passes.branch import BranchRewrite, analyse, plan_branches, sync_candidates

    teacher = TorchProgram(mod)
    ana = analyse(mod, k, activations=teacher.activations(x))
    cost = {c.layer: c.gather_bytes for c in sync_candidates(ana)}
    seen, policies = set(), []
    for label, sync in [("no sync", "none"), *[(f"mass budget {b}", b) for b in budgets],
                        ("every sync kept", "all")]:
        plan = plan_branches(mod, k, sync, analysis=ana)
        if plan.branched in seen:
            continue
        seen.add(plan.branched)
        kept = sorted(set(cost) - plan.branched)
        latency = predicted_latency(BranchRewrite(plan)(mod), cluster) if cluster else None
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
        report = distill(teacher, student, x, y, epochs=epochs, log=lambda _m: None)
        drop = (report.teacher - report.after) * 100
        trials.append(PolicyTrial(label, kept, nbytes, latency if cluster else None, report))
        log(f"policy {label}: {len(plan.branched)} layers cut, {nbytes:,} bytes at sync "
            f"points{priced}; {report.metric} {report.teacher:.4f} -> {report.after:.4f} "
            f"after distillation (drop {drop:.2f} points, limit {max_drop})")
        if drop <= max_drop:
            return plan, student.to_module(), trials
    raise AssertionError("unreachable: the exact policy is always within")


def predicted_latency(student: tvm.IRModule, cluster) -> float:
    """The cost model's latency for a branch module split over ``cluster`` (branch k on
    device k)."""
    from splitc.compiler import build_plan, split
    from splitc.cost import estimate
    from splitc.passes.extract import extract

    ex = extract(split(student, "channel", len(cluster.devices)))
    return estimate(build_plan(ex, cluster.targets, "branch", "policy"), cluster).latency
