"""Branch benchmark: a ResNeXt-style teacher trained on real data (scikit-learn's digits, which
ships offline), compiled with ``--strategy branch`` into K = 2 and 4 branches, distilled, and
compared with the exact splits.

For each K and transmission policy (``--sync none``: exchange only where the model needs the
whole tensor; a mass budget: keep the sync points that cost least per weight; ``all``: exact):

* held-out top-1 accuracy of the teacher, of the branch model before distillation, after
  distillation (``splitc.planning.distill.distill``: soft targets at T=4 plus labels, Adam, on the
  training split), and of the *compiled, distributed* plan after distillation — every test
  image sent through ZeroMQ to one worker process per branch (the artifacts hold the
  distilled weights);
* bytes the devices send each other per inference, against the channel-parallel split of the
  same teacher (gather after every layer): the goal is >= 90 % fewer at <= 1 point lost;
* latency per inference on local workers (loopback, one TVM thread each), next to the exact
  channel and pipeline splits of the teacher.

    .venv/bin/python benchmarks/branch.py                    # K = 2, 4; about 5 minutes
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from splitc import frontend  # noqa: E402
from splitc.backend.torch_program import TorchProgram  # noqa: E402
from splitc.driver import compile_imported, write_extracted  # noqa: E402
from splitc.passes.split.branch import BranchRewrite, analyse, plan_branches  # noqa: E402
from splitc.planning import strategies  # noqa: E402
from splitc.planning.distill import distill, top1  # noqa: E402
from splitc.planning.extract import extract  # noqa: E402
from splitc.runtime.client import connect  # noqa: E402


class Block(nn.Module):
    """ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand, residual."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU())
        self.group = nn.Sequential(nn.Conv2d(width, width, 3, stride, 1, groups=groups,
                                             bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.expand(self.group(self.reduce(x))) + self.short(x))


class Teacher(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(Block(32, 32, 64, 8), Block(64, 32, 64, 8),
                                    Block(64, 64, 128, 8, stride=2), Block(128, 64, 128, 8))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:, None] / 16.0).astype("float32")
    y = d.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def train_teacher(x, y, epochs: int) -> Teacher:
    torch.manual_seed(0)
    model = Teacher()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"],
                          do_constant_folding=True, opset_version=17)
    return path


def distributed(out: Path, x: np.ndarray, y: np.ndarray, repeats: int) -> dict:
    """Every test image through the compiled plan on local workers: accuracy, latency."""
    with connect(out, timeout=60) as session:
        got = session.infer_many([[x[i:i + 1]] for i in range(len(x))], inflight=4)
        acc = float(np.mean([g[0].argmax() == t for g, t in zip(got, y, strict=True)]))
        lat = []
        for i in range(repeats):
            t0 = time.perf_counter()
            session.infer(x[i % len(x):i % len(x) + 1])
            lat.append(time.perf_counter() - t0)
        sent = session.transfer_bytes() / (len(x) + repeats)
    return {"accuracy": acc, "latency": statistics.median(lat), "bytes_measured": sent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", default="2,4")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60, help="distillation epochs")
    ap.add_argument("--repeats", type=int, default=200, help="latency samples per plan")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-branch-"))
    work.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = digits()
    t0 = time.monotonic()
    teacher = train_teacher(xtr, ytr, args.teacher_epochs)
    train_s = time.monotonic() - t0
    onnx_path = export(teacher, work / "teacher.onnx")
    imported = frontend.load(str(onnx_path))
    source = {"model": str(onnx_path), "tiny": False, "input_shapes": {},
              "output_names": list(imported.output_names)}
    program = TorchProgram(imported.mod)
    teacher_acc = float((top1(program, xte, "cpu") == yte).mean())
    print(f"# branch benchmark: ResNeXt-style teacher (4 bottleneck blocks, grouped 3x3, "
          f"{sum(p.numel() for p in teacher.parameters()):,} parameters) trained "
          f"{args.teacher_epochs} epochs on scikit-learn digits (1437 train / 360 test, 8x8) "
          f"in {train_s:.0f} s; imported from ONNX: test top-1 {teacher_acc:.4f}")
    print(f"# distillation: {args.epochs} epochs, soft targets T=4 + labels, Adam 2e-3, on the "
          f"training split; accuracies on the 360 test images; latency: local workers on "
          f"loopback, 1 TVM thread each, {os.cpu_count()} cores, median of {args.repeats}")
    rows = []
    for k in [int(v) for v in args.branches.split(",")]:
        targets = ["host"] * k
        exact = {}
        for strategy in ("channel", "pipeline"):
            out = work / f"{strategy}{k}"
            plan = compile_imported(imported.mod, out, targets, strategy, source=source)
            exact[strategy] = plan.transfer_bytes
            r = distributed(out, xte, yte, args.repeats)
            rows.append({"k": k, "plan": f"{strategy} (exact)", "bytes": plan.transfer_bytes,
                         "before": teacher_acc, "after": teacher_acc,
                         "distributed": r["accuracy"], "latency": r["latency"]})
        ana = analyse(imported.mod, k)
        for sync in ("all", 0.25, "none"):
            bplan = plan_branches(imported.mod, k, sync, analysis=ana)
            student_mod = BranchRewrite(bplan)(imported.mod)
            student = TorchProgram(student_mod)
            before = float((top1(student, xte, "cpu") == yte).mean())
            if bplan.branched:
                distill(TorchProgram(imported.mod), student, xtr, ytr, epochs=args.epochs,
                        log=lambda _m: None)
            after = float((top1(student, xte, "cpu") == yte).mean())
            out = work / f"branch{k}-{sync}"
            split = strategies.get("branch").trained(imported.mod, bplan, student)
            plan = write_extracted(out, extract(split.module), targets, "branch", source,
                                   files=split.files)
            r = distributed(out, xte, yte, args.repeats)
            label = {"all": "branch, every sync kept", "none": "branch, no sync"}.get(
                sync, f"branch, mass budget {sync}")
            rows.append({"k": k, "plan": f"{label} ({len(bplan.branched)} layers cut)",
                         "bytes": plan.transfer_bytes, "before": before, "after": after,
                         "distributed": r["accuracy"], "latency": r["latency"]})
        for row in rows:
            if row["k"] == k:
                row["vs_channel"] = 1 - row["bytes"] / exact["channel"]
    print()
    print("| K | plan | bytes / inference | fewer than channel-parallel | top-1 before "
          "distillation | after | distributed plan | drop (points) | latency (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['plan']} | {r['bytes']:,} | {r['vs_channel'] * 100:.1f} % | "
              f"{r['before']:.4f} | {r['after']:.4f} | {r['distributed']:.4f} | "
              f"{(teacher_acc - r['distributed']) * 100:+.2f} | {r['latency'] * 1e3:.2f} |")
    print()
    goal = [r for r in rows if r["plan"].startswith("branch")
            and r["vs_channel"] >= 0.9 and teacher_acc - r["distributed"] <= 0.01]
    print("goal (>= 90 % fewer bytes than channel-parallel at <= 1 point lost): "
          + ("met by " + "; ".join(f"K={r['k']} {r['plan']}" for r in goal) if goal
             else "NOT met"))
    print(json.dumps({"teacher": teacher_acc, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
