"""Distillation for branch plans: train a branch model (the student) to match the original
(the teacher), both run by :class:`~splitc.backend.torch_program.TorchProgram`.

:func:`distill` trains the student to match the teacher's softened outputs (and the labels,
when given), on a GPU when one is present; :func:`top1` measures either. A model whose output
is a softmax (many shipped classifiers end in one) is distilled on the softmax's input, the
logits (:func:`logits`): softening probabilities again would flatten the targets to nearly
uniform and leave the student's gradients vanishing. ``hints`` (a branch model's parts and
their counterparts in the original, :func:`splitc.passes.split.branch.hints`) add a loss per
part: its mean squared distance to the teacher's channels, over their variance.

Before training, :func:`reconstruct` refits each cut layer of a branch plan in closed form:
a cut convolution or matmul computes its branch's output channels from its branch's inputs
only, and the weights that best give the teacher's values of those channels from what the
student feeds them (least squares on sampled positions, pulled towards the teacher's own
weights) are a far better start than the teacher's weights with the other branches' inputs
dropped (channel pruning's reconstruction step, He et al., ICCV 2017, applied layer after
layer so each fit sees the inputs the refitted layers before it give).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitc.backend.torch_program import TorchProgram, pads
from splitc.errors import SplitcError
from splitc.passes.split.branch import BranchPlan, BranchRewrite


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
    #: after :func:`reconstruct`, before training (None: no plan was given to refit)
    reconstructed: float | None = None
    #: the epoch whose weights were kept (best on the held-out split; 0: the start)
    kept_epoch: int = 0
    #: the learning rate it ended with: ``lr`` halved once per divergence (see :func:`distill`)
    final_lr: float = 0.0


def top1(program: torch.nn.Module, x: np.ndarray, device, batch: int = 256) -> np.ndarray:
    program.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch]).to(device)
            out.append(program(xb)[0].argmax(-1).cpu().numpy())
    return np.concatenate(out)


#: A step whose loss exceeds DIVERGED times the first step's (or LOSS_FLOOR's, when that is
#: more: a student that starts equal to its teacher starts near 0) has diverged
#: (:func:`distill`); after MAX_HALVINGS halvings of the learning rate, training gives up.
DIVERGED, LOSS_FLOOR, MAX_HALVINGS = 20.0, 0.05, 10

#: Ops that only move a classifier's [N, C] output (followed back from the output to a softmax).
_MOVES = {"reshape", "flatten", "alias", "squeeze", "expand_dims"}


def logits_var(program: TorchProgram) -> str | None:
    """The variable holding the logits of ``program``'s first output when that output is a
    softmax over the last axis of an ``[N, C]`` tensor (perhaps reshaped), else None."""
    steps = {s[0]: s for s in program.steps}
    var = program.outputs[0]
    while var in steps and steps[var][1] in _MOVES:
        var = steps[var][2][0][1]
    if var not in steps or steps[var][1] != "nn.softmax":
        return None
    _var, _name, args, attrs, shape = steps[var]
    if shape is None or len(shape) != 2 or int(attrs.axis) % 2 != 1:
        return None
    return args[0][1]


def logits(program: TorchProgram) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> the logits of program's first output``: its input where it is a softmax
    (:func:`logits_var`), else the output itself."""
    var = logits_var(program)
    if var is None:
        return lambda x: program(x)[0]
    # (only what the logits need kept: every value of a 224x224 network on 256 pages is
    # 15 GB, and the teacher's soft targets are computed 256 at a time)
    return lambda x: program.run(x, keep={var})[var].reshape(len(x), -1)


#: Ops of a cut layer that :func:`reconstruct` refits, with the axis of their output channels.
_REFIT = {"nn.conv2d": 1, "matmul": -1}


@dataclass
class Refit:
    """One cut layer's part refitted: its squared error against the teacher's channels on
    the fit's samples, relative to their energy, with the teacher's weights and refitted."""

    part: str
    layer: str        # the original's layer it is a part of
    error_before: float
    error_after: float


def _refit_parts(student: TorchProgram, plan: BranchPlan) -> list[tuple[str, str, np.ndarray]]:
    """(part, original layer, its channels) for each cut convolution (NCHW, OIHW, ungrouped)
    and matmul of ``plan`` in ``student``, in the student's order."""
    steps = {s[0]: (i, s) for i, s in enumerate(student.steps)}
    out = []
    for var in plan.branched:
        b = np.asarray(plan.branches[var])
        for g in range(plan.k):
            i, step = steps.get(f"{var}_b{g}", (None, None))
            if step is None or step[1] not in _REFIT or [a[0] for a in step[2]] != ["var",
                                                                                    "param"]:
                continue
            a = step[3]
            if step[1] == "nn.conv2d" and (a.data_layout != "NCHW" or a.kernel_layout != "OIHW"
                                           or int(a.groups) != 1):
                continue
            out.append((i, step[0], var, np.flatnonzero(b == g)))
    return [(part, var, chans) for _, part, var, chans in sorted(out, key=lambda o: o[0])]


def _patches(step, weight: torch.Tensor, x: torch.Tensor, target: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a cut layer's least-squares fit on a few examples: what its weights
    multiply (a matmul's input rows, a convolution's unfolded patches) and the teacher's
    values of its channels there."""
    if step[1] == "matmul":
        return x.reshape(-1, weight.shape[0]), target.reshape(-1, weight.shape[1])
    att = step[3]
    top, left, bottom, right = pads(att.padding)
    a = F.unfold(F.pad(x, (left, right, top, bottom)), tuple(weight.shape[2:]),
                 dilation=[int(d) for d in att.dilation],
                 stride=[int(s) for s in att.strides])  # (N, C*kh*kw, L)
    return (a.transpose(1, 2).reshape(-1, a.shape[1]),
            target.permute(0, 2, 3, 1).reshape(-1, weight.shape[0]))


def reconstruct(teacher: TorchProgram, student: TorchProgram, plan: BranchPlan,
                x: np.ndarray, *, samples: int = 128, rows: int = 16384,
                ridge: float = 1e-2, seed: int = 0) -> list[Refit]:
    """Refit the cut layers of ``student`` (the branch model of ``plan``) on ``x``, in place
    (module docstring). Each part's weights ``W`` minimise ``|A W - T|^2 + lam |W - W0|^2``:
    ``A`` the patches the student feeds it (at most ``rows`` of them, drawn from the first
    ``samples`` examples), ``T`` the teacher's values of its channels there, ``W0`` the
    teacher's weights, ``lam`` ``ridge`` x the mean of ``A``'s squared column norms. The fit
    never raises the error on its samples (``W0`` is a candidate)."""
    parts = _refit_parts(student, plan)
    if not parts:
        return []
    rng = np.random.default_rng(seed)
    device = next(student.parameters()).device
    xs = torch.from_numpy(np.ascontiguousarray(x[:samples], np.float32)).to(device)
    steps = {s[0]: s for s in student.steps}
    order = {s[0]: i for i, s in enumerate(student.steps)}
    last = {r: i for i, refs in enumerate(student.last_uses()) for r in refs}
    srcs = [steps[part][2][0][1] for part, _, _ in parts]
    per_example = max(1, rows // len(xs))
    out = []
    with torch.no_grad():
        # only what the fits read is kept: every value of a 224x224 network on 128
        # examples (teacher and student) took more than 24 GB
        t_env = teacher.run(xs, keep={var for _, var, _ in parts})
        s_env: dict[str, torch.Tensor] = {}
        for n, (part, var, chans) in enumerate(parts):
            step = steps[part]
            src, key = step[2][0][1], step[2][1][1]
            # what comes before this part does not depend on the weights refitted so far
            # beyond what is already computed: continue the run up to it
            s_env = student.run(xs, until=part, env=s_env, keep=set(srcs[n:]))
            weight = student.weights[key]
            axis = _REFIT[step[1]]
            target = t_env[var].index_select(axis, torch.from_numpy(chans).to(device))
            a, t = [], []
            for i in range(0, len(xs), 8):  # (patches unfolded a few examples at a time)
                ai, ti = _patches(step, weight, s_env[src][i:i + 8], target[i:i + 8])
                m = per_example * min(8, len(xs) - i)
                if len(ai) > m:
                    pick = torch.from_numpy(rng.choice(len(ai), m, replace=False)).to(device)
                    ai, ti = ai[pick], ti[pick]
                a.append(ai.double())
                t.append(ti.double())
            a, t = torch.cat(a), torch.cat(t)
            w0 = (weight if step[1] == "matmul" else
                  weight.reshape(weight.shape[0], -1).t()).double()
            gram = a.t() @ a
            lam = ridge * float(gram.diagonal().mean()) + 1e-12
            eye = torch.eye(len(gram), dtype=gram.dtype, device=device)
            w = torch.linalg.solve(gram + lam * eye, a.t() @ t + lam * w0)
            energy = float((t ** 2).sum()) + 1e-30
            before = float(((a @ w0 - t) ** 2).sum()) / energy
            after = float(((a @ w - t) ** 2).sum()) / energy
            if after < before:
                new = w if step[1] == "matmul" else w.t().reshape(weight.shape)
                weight.copy_(new.to(weight.dtype))
                s_env = {v: t for v, t in s_env.items() if order.get(v, -1) < order[part]}
            for done in set(srcs[:n + 1]) - set(srcs[n + 1:]):
                if last.get(done, -1) <= order[part]:  # nothing still to run reads it
                    s_env.pop(done, None)
            out.append(Refit(part, var, before, min(before, after)))
    return out


def cut_losses(teacher: TorchProgram, mod, plan: BranchPlan, x: np.ndarray,
               **kwargs) -> dict[str, float]:
    """What cutting each layer of ``plan`` (the original ``mod``'s branch plan) costs, measured:
    the relative squared error its refitted parts leave against the teacher's channels on
    ``x`` (:func:`reconstruct`, on a fresh branch model; the mean over its parts), by layer.
    For :func:`~splitc.passes.split.branch.keep_where_cuts_hurt`: cut every candidate
    (``plan_branches(mod, k, "none")``) to price them all."""
    student = TorchProgram(BranchRewrite(plan)(mod))
    by_layer: dict[str, list[float]] = {}
    for r in reconstruct(teacher, student, plan, x, **kwargs):
        by_layer.setdefault(r.layer, []).append(r.error_after)
    return {layer: float(np.mean(v)) for layer, v in by_layer.items()}


def distill(teacher: TorchProgram, student: TorchProgram, x: np.ndarray,
            y: np.ndarray | None = None, *, epochs: int = 30, lr: float = 2e-3,
            batch: int = 64, temperature: float = 4.0, val_fraction: float = 0.2,
            seed: int = 0, log: Callable[[str], None] = print,
            progress: Callable[[float, str], None] | None = None,
            hints: Sequence = (), hint_weight: float = 1.0,
            plan: BranchPlan | None = None) -> Report:
    """Train ``student`` to match ``teacher`` (soft targets at ``temperature``, plus the
    labels ``y`` when given, plus ``hint_weight`` x the mean loss of the ``hints``: the
    module docstring) on ``x``; report held-out accuracy before and after, keeping the weights
of the epoch (or the start) that scored best on the held-out split. With the branch
    ``plan`` the student is of, its cut layers are first refitted (:func:`reconstruct`, on
    the training examples); ``epochs=0`` then only refits.
    ``progress(fraction done, text)`` is told after every epoch (the CLI's rich bar)."""
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
    reconstructed = None
    if plan is not None:
        refits = reconstruct(teacher, student, plan, x[train], seed=seed)
        reconstructed = score(student)
        if refits:
            log(f"refitted {len(refits)} parts of cut layers: squared error against the "
                f"teacher's channels {np.mean([r.error_before for r in refits]):.3f} -> "
                f"{np.mean([r.error_after for r in refits]):.3f} (mean, relative); "
                f"{metric} {before:.4f} -> {reconstructed:.4f}")
    trained = [p for p in student.parameters() if p.requires_grad]
    xt = torch.from_numpy(x[train]).to(device)
    yt = torch.from_numpy(y[train].astype(np.int64)).to(device) if y is not None else None
    with torch.no_grad():
        t_logits = logits(teacher)
        soft = torch.cat([t_logits(xt[i:i + 256]) for i in range(0, len(xt), 256)])
    s_logits = logits(student)
    s_var = logits_var(student) or student.outputs[0]
    channels = {h.part: torch.from_numpy(np.asarray(h.channels)).to(device) for h in hints}
    t_keep, s_keep = {h.original for h in hints}, {h.part for h in hints} | {s_var}
    t0 = time.monotonic()
    steps = math.ceil(len(train) / batch)
    # the held-out fifth picks the epoch kept, the start (refitted) included: two epochs of
    # Adam on 154 pages took a refitted page-orientation student from 0.90 to 0.28
    best = (before if reconstructed is None else reconstructed, 0,
            {k: v.detach().clone() for k, v in student.state_dict().items()})
    # A step that sends the loss past DIVERGED x where it started (or to inf/nan) restarts the
    # epoch from its first weights at half the learning rate, with a fresh Adam: Adam's first
    # steps move every weight by about lr, and 2e-3 took a refitted page classifier's loss
    # from 0.65 to 2,600 in one step and 10^6 in four (the epoch's held-out score 0.24)
    scale, start_loss, epoch = 1.0, None, 0
    opt = torch.optim.Adam(trained, lr=lr)
    while epoch < epochs:
        for group in opt.param_groups:  # (cosine annealing over the epochs)
            group["lr"] = lr * scale * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
        student.train()
        perm = torch.randperm(len(train), device=device)
        total, diverged = 0.0, False
        first = {k: v.detach().clone() for k, v in student.state_dict().items()}
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            hint_loss = 0.0
            if hints:
                with torch.no_grad():
                    t_env = teacher.run(xt[idx], keep=t_keep)
                s_env = student.run(xt[idx], keep=s_keep)
                out = s_env[s_var].reshape(len(idx), -1)
                for h in hints:
                    t = t_env[h.original].index_select(h.axis, channels[h.part])
                    hint_loss = hint_loss + ((s_env[h.part] - t) ** 2).mean() / (t.var() + 1e-6)
                hint_loss = hint_weight * hint_loss / len(hints)
            else:
                out = s_logits(xt[idx])
            loss = F.kl_div(F.log_softmax(out / temperature, -1),
                            F.softmax(soft[idx] / temperature, -1),
                            reduction="batchmean") * temperature ** 2
            if yt is not None:
                loss = 0.5 * loss + 0.5 * F.cross_entropy(out, yt[idx])
            loss = loss + hint_loss
            value = float(loss.detach())
            if start_loss is None and math.isfinite(value):
                start_loss = max(value, LOSS_FLOOR)
            if not math.isfinite(value) or value > DIVERGED * (start_loss or LOSS_FLOOR):
                diverged = True
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += value
        if diverged:
            if scale < 2.0 ** -MAX_HALVINGS:
                log(f"the loss diverges at every learning rate down to {lr * scale:.2g}: "
                    f"training stops at epoch {epoch + 1} of {epochs}")
                student.load_state_dict(first)
                break
            scale /= 2
            log(f"epoch {epoch + 1}: the loss went to {value:.3g} at step {s + 1} "
                f"({start_loss or math.nan:.3g} at the start): again from the epoch's first "
                f"weights at learning rate {lr * scale:.2g}")
            student.load_state_dict(first)
            opt = torch.optim.Adam(trained, lr=lr * scale)
            continue
        epoch += 1
        held_out = score(student)
        if held_out >= best[0]:  # (a tie: the metric cannot tell, training is trusted)
            best = (held_out, epoch,
                    {k: v.detach().clone() for k, v in student.state_dict().items()})
        if progress:
            progress(epoch / epochs, f"epoch {epoch}/{epochs} loss {total / steps:.4f}, "
                                     f"held out {held_out:.4f}")
    after, kept, state = best
    student.load_state_dict(state)
    student.cpu()
    teacher.cpu()
    report = Report(metric, teacher_score, before, after, epochs, time.monotonic() - t0,
                    str(device), reconstructed, kept, lr * scale)
    log(f"{metric} on {n_val} held-out examples: teacher {teacher_score:.4f}, branch model "
        f"before distillation {before:.4f}, after {after:.4f} (the best of {epochs} epochs "
        f"and the start: epoch {kept}; {report.seconds:.1f} s on {device})")
    return report
