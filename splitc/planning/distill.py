"""Distillation for branch plans: train a branch model (the student) to match the original
(the teacher), both run by :class:`~splitc.backend.torch_program.TorchProgram`.

:func:`distill` trains the student to match the teacher's softened outputs (and the labels,
when given), on a GPU when one is present; :func:`top1` measures either. A model whose output
is a softmax (many shipped classifiers end in one) is distilled on the softmax's input, the
logits (:func:`logits`): softening probabilities again would flatten the targets to nearly
uniform and leave the student's gradients vanishing. ``hints`` (a branch model's parts and
their counterparts in the original, :func:`splitc.passes.split.branch.hints`) add a loss per
part: its mean squared distance to the teacher's channels, over their variance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitc.backend.torch_program import TorchProgram
from splitc.errors import SplitcError


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
    return lambda x: program.run(x)[var].reshape(len(x), -1)


def distill(teacher: TorchProgram, student: TorchProgram, x: np.ndarray,
            y: np.ndarray | None = None, *, epochs: int = 30, lr: float = 2e-3,
            batch: int = 64, temperature: float = 4.0, val_fraction: float = 0.2,
            seed: int = 0, log: Callable[[str], None] = print,
            progress: Callable[[float, str], None] | None = None,
            hints: Sequence = (), hint_weight: float = 1.0) -> Report:
    """Train ``student`` to match ``teacher`` (soft targets at ``temperature``, plus the
    labels ``y`` when given, plus ``hint_weight`` x the mean loss of the ``hints``: the
    module docstring) on ``x``; report held-out accuracy before and after.
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
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    xt = torch.from_numpy(x[train]).to(device)
    yt = torch.from_numpy(y[train].astype(np.int64)).to(device) if y is not None else None
    with torch.no_grad():
        t_logits = logits(teacher)
        soft = torch.cat([t_logits(xt[i:i + 256]) for i in range(0, len(xt), 256)])
    s_logits = logits(student)
    s_var = logits_var(student) or student.outputs[0]
    channels = {h.part: torch.from_numpy(np.asarray(h.channels)).to(device) for h in hints}
    t0 = time.monotonic()
    steps = math.ceil(len(train) / batch)
    for epoch in range(epochs):
        student.train()
        perm = torch.randperm(len(train), device=device)
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            hint_loss = 0.0
            if hints:
                with torch.no_grad():
                    t_env = teacher.run(xt[idx])
                s_env = student.run(xt[idx])
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
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        if progress:
            progress((epoch + 1) / epochs,
                     f"epoch {epoch + 1}/{epochs} loss {total / steps:.4f}")
    after = score(student)
    student.cpu()
    teacher.cpu()
    report = Report(metric, teacher_score, before, after, epochs, time.monotonic() - t0,
                    str(device))
    log(f"{metric} on {n_val} held-out examples: teacher {teacher_score:.4f}, branch model "
        f"before distillation {before:.4f}, after {after:.4f} ({epochs} epochs, "
        f"{report.seconds:.1f} s on {device})")
    return report
