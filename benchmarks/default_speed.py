"""Default-schedule speed: splitc's code against ONNX Runtime and torch on one core.

For each model, in one process pinned to one core (``sched_setaffinity``, one thread each:
``TVM_NUM_THREADS=1``, ``torch.set_num_threads(1)``, ONNX Runtime ``intra_op_num_threads=1``):

* ONNX Runtime on the model's ONNX file (the zoo exports one; ``.onnx`` paths are used as is);
* torch eager (zoo models only);
* splitc with its default schedules (``splitc.backend.build.build``: packed convolutions, scheduled
  conv/matmul/pool, weights packed at compile time), no tuning, no selection ("default");
* splitc as a compile builds it: the same after the quick schedule selection on this CPU
  (``splitc.backend.tuning.tune`` with no trials: each kernel's few default-schedule
  candidates measured, the fastest kept; "selected"). The selection runs into a fresh cache,
  so "select s" is what a first compile on this CPU pays; "reuse s" is a second selection of
  the same model (kernels found, nothing measured), what every later compile pays;
* splitc with TVM's plain lowering (what ``tvm.compile`` gives without schedules; slow, so
  one run; ``--no-plain`` skips it).

Latency is the median of ``--repeats`` rounds after one warm-up, each round one call of
every runtime in turn (a slow spell of a shared machine falls on all alike). splitc's output
is checked against ONNX Runtime's on the same input (max abs error printed). With
``--tuning-db DIR`` (from ``splitc tune --db DIR``) a "tuned" column adds splitc with those
records.

    .venv/bin/python benchmarks/default_speed.py --light    # + real-world ONNX graphs
    .venv/bin/python benchmarks/default_speed.py --models resnet18 --tiny --no-plain
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "1"  # before TVM starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import cpu_name, interleaved, ort_runner  # noqa: E402

from splitc import frontend, targets  # noqa: E402
from splitc.backend.build import build  # noqa: E402
from splitc.backend.tuning import tune  # noqa: E402
from splitc.backend.tuning_db import database_for  # noqa: E402
from splitc.frontend import zoo  # noqa: E402
from splitc.passes.ir import lift_weights  # noqa: E402

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "vgg16"]
LIGHT = ["resnet50", "densenet121", "squeezenet", "inception_v1"]
GOAL = 1.0  # splitc default schedules: at most ONNX Runtime's latency, on every CPU met


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn`` alone, after one warm-up call."""
    return interleaved({"fn": fn}, repeats)["fn"]


def tvm_runner(model: frontend.ImportedModel, x, *, schedules: bool, tuning_db=None):
    import tvm
    from tvm import relax

    func, arrays = lift_weights(model.mod["main"])
    start = time.perf_counter()
    ex, weights = build(tvm.IRModule({"main": func}), targets.get("host").tvm_target(),
                        {"main": arrays}, schedules=schedules, tuning_db=tuning_db)
    build_s = time.perf_counter() - start
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in x] + [tvm.runtime.tensor(w) for w in weights["main"]]

    def run():
        out = vm["main"](*args)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    return run, build_s


def selected_runner(model: frontend.ImportedModel, x, cache: Path):
    """splitc as compiled after selecting schedules on this CPU into ``cache`` (fresh per
    run): the runner, the first selection's seconds, and a second one's (all reused)."""
    import tvm

    os.environ["SPLITC_CACHE"] = str(cache)
    func, _ = lift_weights(model.mod["main"])
    module = tvm.IRModule({"main": func})
    spec = targets.get("host")
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        tune(module, spec, None, 0, log=lambda _m: None)
        seconds.append(time.perf_counter() - start)
    run, _ = tvm_runner(model, x, schedules=True, tuning_db=database_for(spec))
    return run, seconds[0], seconds[1]


def torch_runner(name: str, tiny: bool, x):
    """A call of the zoo model in torch eager with one thread (None for other models)."""
    import torch

    if name not in zoo.names():
        return None
    torch.set_num_threads(1)
    module = zoo.build(name, tiny=tiny).eval()
    inp = [torch.from_numpy(a) for a in x]

    def run():
        with torch.no_grad():
            return module(*inp)

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="zoo names or .onnx paths (e.g. the onnx package's real-world "
                         "light_*.onnx files: --light)")
    ap.add_argument("--light", action="store_true",
                    help="add the light_*.onnx models the onnx package ships (ResNet-50, "
                         "DenseNet-121, SqueezeNet, Inception-v1: real exported graphs)")
    ap.add_argument("--tiny", action="store_true", help="the zoo models' tiny variants")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-lowering column")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--save", type=Path, default=None,
                    help="add this run at the top of DIR/default-speed-<size>-<LLVM cpu>.txt "
                         "(one file per CPU: a new CPU adds a file, earlier runs are kept)")
    ap.add_argument("--tuning-db", type=Path, default=None,
                    help="add a column: splitc with this tuning database (splitc tune --db)")
    args = ap.parse_args()
    if args.light:
        import onnx

        light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
        args.models += [str(light / f"light_{m}.onnx") for m in LIGHT]

    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})
    spec = targets.get("host")
    mcpu = spec.tvm_target().attrs["mcpu"]
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"# {time.strftime('%Y-%m-%d %H:%M')}, `benchmarks/default_speed.py "
        f"{' '.join(sys.argv[1:])}`")
    say(f"# one core (cpu {core}) of {cpu_name()} ({platform.machine()}), LLVM cpu {mcpu}; one "
        f"thread for every runtime; median of {args.repeats} rounds, one call of each runtime "
        "per round")
    header = (f"{'model':<24} {'ORT ms':>8} {'torch ms':>9} {'plain ms':>9} {'default ms':>10} "
              f"{'selected ms':>11} {'tuned ms':>9} {'splitc/ORT':>10} {'goal':>6} "
              f"{'build s':>8} {'select s':>8} {'reuse s':>8} {'max err':>9}")
    say(header)
    rows = []
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="default-speed-"))
    for name in args.models:
        model = frontend.load(name, None, tiny=args.tiny)
        x = model.random_inputs()
        ref = model.reference(x)[0]
        run, build_s = tvm_runner(model, x, schedules=True)
        selected, select_s, reuse_s = selected_runner(model, x, scratch / Path(name).stem)
        err = max(float(np.abs(run() - ref).max()), float(np.abs(selected() - ref).max()))
        runs = {"ort": ort_runner(model, x), "splitc": run, "selected": selected}
        torch_run = torch_runner(name, args.tiny, x)
        if torch_run is not None:
            runs["torch"] = torch_run
        if args.tuning_db:
            runs["tuned"], _ = tvm_runner(
                model, x, schedules=True,
                tuning_db=database_for(targets.get("host"), args.tuning_db))
        seconds = interleaved(runs, args.repeats)
        ort_s, splitc_s, selected_s = seconds["ort"], seconds["splitc"], seconds["selected"]
        torch_s, tuned_s = seconds.get("torch"), seconds.get("tuned")
        plain_s = None
        if not args.no_plain:
            plain, _ = tvm_runner(model, x, schedules=False)
            plain_s = median_seconds(plain, 1)
        ratio = selected_s / ort_s
        label = Path(name).stem if name.endswith(".onnx") else name
        row = {"model": label + (" (tiny)" if args.tiny else ""), "ort_ms": ort_s * 1e3,
               "torch_ms": torch_s * 1e3 if torch_s else None,
               "plain_ms": plain_s * 1e3 if plain_s else None, "splitc_ms": splitc_s * 1e3,
               "selected_ms": selected_s * 1e3, "tuned_ms": tuned_s * 1e3 if tuned_s else None,
               "splitc_over_ort": ratio, "meets_goal": ratio <= GOAL, "build_s": build_s,
               "select_s": select_s, "reuse_s": reuse_s, "max_abs_err": err}
        rows.append(row)

        def ms(v):
            return f"{v:.1f}" if v is not None else "-"

        say(f"{row['model']:<24} {ms(row['ort_ms']):>8} {ms(row['torch_ms']):>9} "
            f"{ms(row['plain_ms']):>9} {ms(row['splitc_ms']):>10} {ms(selected_s * 1e3):>11} "
            f"{ms(row['tuned_ms']):>9} {ratio:>9.2f}x {'met' if ratio <= GOAL else 'MISSED':>6} "
            f"{build_s:>8.1f} {select_s:>8.1f} {reuse_s:>8.1f} {err:>9.1e}")
    say(f"# goal: splitc as compiled (selected schedules, no tuning) at most {GOAL:.1f}x ONNX "
        "Runtime on one core; splitc/ORT is selected / ORT")
    say(json.dumps(rows))
    if args.save:
        size = "tiny" if args.tiny else "224"
        path = args.save / f"default-speed-{size}-{mcpu}.txt"
        earlier = path.read_text() if path.exists() else ""
        path.write_text("\n".join(lines) + "\n" + (f"\n# earlier:\n{earlier}" if earlier else ""))
        print(f"# wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
