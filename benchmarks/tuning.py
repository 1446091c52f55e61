"""Tuning benchmark: what a trial budget of MetaSchedule buys over splitc's default schedules,
next to ONNX Runtime and torch, on one core.

For each model: ``splitc.backend.tuning.tune`` with ``--trials`` (each kernel's default schedule is
a record first, then the search; the tuning time is printed), then in one process pinned to
one core, side by side: TVM's plain lowering (untuned), splitc's default schedules, splitc
with the tuning records, ONNX Runtime and torch eager — latency (median), and tuned over
ONNX Runtime (goal: at most 1.0x, at the stated budget).

    .venv/bin/python benchmarks/tuning.py --models resnet18 --trials 300
    .venv/bin/python benchmarks/tuning.py --models mlp resnet18 --tiny --trials 32   # quick
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import interleaved, ort_runner  # noqa: E402
from default_speed import median_seconds, torch_runner, tvm_runner  # noqa: E402

from splitc import frontend, targets  # noqa: E402
from splitc.backend.tuning import tune  # noqa: E402
from splitc.backend.tuning_db import database_for  # noqa: E402
from splitc.passes.ir import lift_weights  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--trials", type=int, default=300, help="MetaSchedule trials per model")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--db", type=Path, default=None, help="tuning database folder (kept)")
    args = ap.parse_args()
    import tvm

    spec = targets.get("host")
    db = args.db or Path(tempfile.mkdtemp(prefix="splitc-tuning-"))
    core = sorted(os.sched_getaffinity(0))[-1]
    rows = []
    for name in args.models:
        model = frontend.load(name, None, tiny=args.tiny)
        func, _ = lift_weights(model.mod["main"])
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) | {core})  # tuning: all cores
        t0 = time.perf_counter()
        kernels = tune(tvm.IRModule({"main": func}), spec, db, args.trials, log=lambda _m: None)
        tuning_s = time.perf_counter() - t0
        os.sched_setaffinity(0, {core})  # measuring: one core
        x = model.random_inputs()
        ref = model.reference(x)[0]
        default, _ = tvm_runner(model, x, schedules=True)
        tuned, _ = tvm_runner(model, x, schedules=True, tuning_db=database_for(spec, db))
        plain, _ = tvm_runner(model, x, schedules=False)
        err = float(np.abs(tuned() - ref).max())
        runs = {"ort": ort_runner(model, x), "default": default, "tuned": tuned}
        torch_run = torch_runner(name, args.tiny, x)
        if torch_run is not None:
            runs["torch"] = torch_run
        seconds = interleaved(runs, args.repeats)
        torch_s = seconds.get("torch")
        row = {"model": name + (" (tiny)" if args.tiny else ""), "kernels": len(kernels),
               "trials": args.trials, "tuning_s": tuning_s,
               "plain_ms": median_seconds(plain, 1) * 1e3,
               "default_ms": seconds["default"] * 1e3, "tuned_ms": seconds["tuned"] * 1e3,
               "ort_ms": seconds["ort"] * 1e3, "torch_ms": torch_s * 1e3 if torch_s else None,
               "max_abs_err": err,
               "improved_kernels": sum(1 for k in kernels if k["best_s"] and k["default_s"]
                                       and k["best_s"] < 0.97 * k["default_s"])}
        row["tuned_over_ort"] = row["tuned_ms"] / row["ort_ms"]
        rows.append(row)
    print(f"# one core (cpu {core}), one thread per runtime, median of {args.repeats} rounds "
          "(one call of each runtime per round); tuning on all cores of this machine")
    print("| model | kernels | trials | tuning (s) | kernels improved | plain TVM (ms) | "
          "default schedules (ms) | tuned (ms) | ONNX Runtime (ms) | torch (ms) | tuned / ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        torch_ms = f"{r['torch_ms']:.2f}" if r["torch_ms"] else "-"
        print(f"| {r['model']} | {r['kernels']} | {r['trials']} | {r['tuning_s']:.0f} | "
              f"{r['improved_kernels']} | {r['plain_ms']:.2f} | {r['default_ms']:.2f} | "
              f"{r['tuned_ms']:.2f} | {r['ort_ms']:.2f} | {torch_ms} | "
              f"{r['tuned_over_ort']:.2f}x |")
    print("# goal: tuned at most 1.0x ONNX Runtime at the stated trial budget")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
