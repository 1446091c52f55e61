"""``splitc compile``: the top-level driver, frontend → planning → backend.

1. :mod:`splitc.frontend` imports the model into Relax;
2. :mod:`splitc.planning` chooses the split — a registered strategy
   (:mod:`splitc.planning.strategies`) plans and rewrites, or ``auto``'s search prices every
   strategy's candidates — and :func:`~splitc.planning.extract.extract` cuts the split module
   into per-device modules and the plan (the runtime's schema, devices by the cluster's names);
3. :mod:`splitc.backend` builds each device for its target's kind and writes the folder;
4. with ``spares``, :mod:`splitc.planning.fallback` plans the survivors of every loss of up
   to that many devices the same way (before anything is built) and the backend adds those
   plans to the folder (:mod:`splitc.runtime.fallback` says how they lie there).

Nothing imports this module but the CLI (and tests): it is the one place that knows the order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tvm

from splitc import frontend
from splitc import targets as target_registry
from splitc.backend import artifacts
from splitc.backend.fpga import FpgaOptions
from splitc.backend.kinds import BuildOptions
from splitc.errors import SplitcError
from splitc.frontend.data import check_examples, load_data
from splitc.planning import fallback, strategies
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DEFAULT_RUNTIME_SECONDS_PER_BYTE, DeviceSpeed
from splitc.planning.extract import Extracted, extract
from splitc.planning.profiler import Progress
from splitc.planning.search import search
from splitc.planning.speeds import cluster_speeds
from splitc.runtime import fallback as fallback_format
from splitc.runtime.client import connect
from splitc.runtime.plan import Plan

Log = Callable[[str], None]

#: The strategy name that asks the cost-model search to choose (see :mod:`splitc.planning.search`).
AUTO = "auto"
#: Where the compile records how to load the original model again (for ``splitc run --check``
#: and ``splitc tune OUT``).
REFERENCE_FILE = "reference.json"


def strategy_names() -> list[str]:
    """Every name ``--strategy`` takes."""
    return [*strategies.names(), AUTO]


def check_request(cluster: Cluster, strategy: str, spares: int = 0) -> None:
    """Refuse an unknown strategy, or too few devices for it, or spares that cannot be given,
    before any work (targets were checked when the cluster was made)."""
    if not cluster.devices:
        raise SplitcError("give at least one device (--devices host,host)")
    if spares < 0:
        raise SplitcError(f"--spares {spares}: give 0 (no fallback plans) or more")
    if spares:
        if spares >= len(cluster.devices):
            raise SplitcError(f"--spares {spares}: the cluster has {len(cluster.devices)} "
                              f"device(s); at most {len(cluster.devices) - 1} can be lost")
        if strategy != AUTO and not strategies.get(strategy).exact:
            raise SplitcError(f"--spares: the {strategy} strategy is approximate, and its "
                              "plan over fewer devices would be another model; use an exact "
                              "strategy (or auto)")
        inexact = sorted({d.target for d in cluster.devices
                          if not artifacts.kind_exact(d.target)})
        if inexact:
            raise SplitcError(f"--spares: {', '.join(inexact)} compute in fixed point, and "
                              "fallback plans for them are not checked yet; give --spares "
                              "only for CPU targets")
    if strategy == AUTO:
        return
    chosen = strategies.get(strategy)
    if len(cluster.devices) < chosen.min_devices:
        raise SplitcError(f"the {strategy} strategy needs at least {chosen.min_devices} "
                          f"devices, got {len(cluster.devices)}")


def stated_speeds(cluster: Cluster, log: Log, progress: Progress | None = None
                  ) -> tuple[DeviceSpeed, ...] | None:
    """The devices' speeds when the cluster file states any (``gflops`` or ``profile``): a
    strategy then plans with them, as ``auto``'s candidates do. None when it states none:
    the devices count as equal and nothing is measured."""
    if not any(d.gflops or d.profile for d in cluster.devices):
        return None
    return tuple(cluster_speeds(cluster, log=log, progress=progress))


def compile_model(model: str, out_dir: str | Path, devices: list[str] | None = None,
                  strategy: str = "pipeline", *,
                  input_shapes: Mapping[str, Sequence[int]] | None = None, tiny: bool = False,
                  cluster: Cluster | None = None, objective: str = "latency",
                  tuning_db: str | Path | None = None, sync: str | float = "none",
                  calibration: str | Path | None = None, max_accuracy_drop: float = 1.0,
                  epochs: int = 30, fpga: FpgaOptions | None = None, spares: int = 0,
                  log: Log = lambda _msg: None, progress: Progress | None = None) -> Plan:
    """Compile ``model`` for ``devices`` (target names) or a ``cluster`` with ``strategy``
    (``auto``: the cost-model search picks it); write ``out_dir``.

    Returns the plan, also written to ``out_dir/plan.json`` and to every device folder.
    ``sync``, ``calibration``, ``max_accuracy_drop``, ``epochs``: options of the branch
    strategy (:mod:`splitc.planning.strategies.branch`). ``fpga``: how devices of FPGA
    targets are built; their pieces are then checked on ``calibration`` (or 256 seeded random
    inputs) against float. ``spares``: also compile a fallback plan for every loss of up to
    that many of the plan's devices (:mod:`splitc.planning.fallback`). ``progress``: told how
    a first-use profile of the host goes, then each device's build (and each fallback's).
    """
    if cluster is None:
        if not devices:
            raise SplitcError("give at least one device (--devices host,host)")
        cluster = Cluster.uniform(devices)
    check_request(cluster, strategy, spares)
    started = time.perf_counter()
    imported = frontend.load(model, input_shapes, tiny=tiny)
    log(f"imported {imported.source}")
    source = {"model": model, "tiny": tiny,
              "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()},
              "output_names": list(imported.output_names), **model_file(model, out_dir)}
    build_options = BuildOptions(tuning_db=tuning_db, fpga=fpga or FpgaOptions())
    options: dict = {}
    if strategy == AUTO:
        speeds = cluster_speeds(cluster, log=log, progress=progress)
        result = search(imported.mod, cluster, speeds, objective=objective,
                        source=label(source), options=build_options)
        best = result.best
        log(f"auto: chose {best.label} (predicted latency {best.estimate.latency * 1e3:.2f} ms,"
            f" {best.estimate.transfer_bytes:,} bytes per inference)")
        used = list(best.devices)
        ex = extract(best.split_mod, [cluster.devices[i].name for i in used],
                     imported.layer_names)
        targets, chosen_name, files = [cluster.devices[i].target for i in used], \
            best.strategy, {}
    else:
        chosen = strategies.get(strategy)
        options = {"sync": sync, "calibration": calibration,
                   "max_accuracy_drop": max_accuracy_drop, "epochs": epochs}
        speeds = (tuple(cluster_speeds(cluster, log=log, progress=progress))
                  if chosen.needs_speeds(options) else stated_speeds(cluster, log, progress))
        ctx = strategies.Context(len(cluster.devices), speeds, cluster, options, log)
        split = chosen.split(imported.mod, ctx)
        ex = extract(split.module, [d.name for d in cluster.devices], imported.layer_names)
        used = [i for i, d in enumerate(cluster.devices) if d.name in ex.modules]
        targets, chosen_name, files = cluster.targets, chosen.name, split.files
    planned = time.perf_counter()
    fallbacks = []
    if spares:  # (planned before anything is built: a loss it cannot survive fails at once)
        fallbacks = fallback.plan_fallbacks(
            imported.mod, cluster, used, strategy, spares, speeds=speeds, options=options,
            objective=objective, source=label(source), build_options=build_options,
            layer_names=imported.layer_names, log=log)
    fallbacks_planned = time.perf_counter()
    plan = write_extracted(out_dir, ex, targets, chosen_name, source, files=files,
                           options=build_options, log=log, progress=progress)
    if artifacts.needs_check(plan):
        artifacts.check(out_dir, plan, imported.mod, check_inputs(imported, calibration, log),
                        build_options, log)
    if fallbacks:
        main_seconds = (planned - started) + (time.perf_counter() - fallbacks_planned)
        write_fallbacks(out_dir, plan, fallbacks, cluster, spares, source, build_options,
                        main_seconds, fallbacks_planned - planned, log, progress)
    return plan


def write_fallbacks(out_dir: str | Path, main: Plan, fallbacks: Sequence[fallback.FallbackSplit],
                    cluster: Cluster, spares: int, source: Mapping, options: BuildOptions,
                    main_seconds: float, planning_seconds: float, log: Log,
                    progress: Progress | None = None) -> None:
    """Build the fallback plans into the folder the main plan was written to, check that
    every board can hold all its plans at once, and write the index with what they cost
    (compile seconds and bytes on disk, against the main plan's); a failed check removes
    the folder."""
    t0 = time.perf_counter()
    main_bytes = artifacts.folder_bytes(out_dir)
    cache = artifacts.BuildCache()
    written = []
    try:
        for i, f in enumerate(fallbacks):
            if progress:
                progress(i / len(fallbacks), f"building fallback plan {f.name} "
                         f"({i + 1}/{len(fallbacks)})")
            plan = f.extracted.plan(f.targets, f.strategy, label(source),
                                    source.get("output_names"))
            plan = artifacts.write_fallback(out_dir, f.name, plan, main, f.extracted.modules,
                                            f.extracted.weights, cache, options=options,
                                            log=log)
            written.append(fallback_format.Fallback(f.name, f.lost, plan, f.label))
        fallback.check_held(main, [w.plan for w in written], cluster)
    except SplitcError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        cache.close()
    seconds = planning_seconds + time.perf_counter() - t0
    extra = artifacts.folder_bytes(out_dir) - main_bytes
    fallback_format.write_index(
        out_dir, main, spares, written,
        compile_seconds={"main": round(main_seconds, 3), "fallbacks": round(seconds, 3)},
        bytes={"main": main_bytes, "fallbacks": extra},
        builds={"devices": sum(len(w.active) for w in written), "reused": cache.hits})
    log(f"fallbacks: {len(written)} plan(s) for losing up to {spares} of "
        f"{', '.join(d.name for d in main.devices if main.pieces_on(d.name))}: "
        f"+{seconds:.1f} s to compile (the main plan took {main_seconds:.1f} s), "
        f"+{extra / 2**20:.2f} MiB on disk (the main plan: {main_bytes / 2**20:.2f} MiB); "
        f"{cache.hits} of {sum(len(w.active) for w in written)} fallback devices reused a "
        "build")


def label(source: Mapping) -> str:
    """What the plan says it was compiled from."""
    return source["model"] + (" (tiny)" if source.get("tiny") else "")


def write_extracted(out_dir: str | Path, ex: Extracted, targets: Sequence[str], strategy: str,
                    source: Mapping, *, files: Mapping[str, str | bytes] | None = None,
                    options: BuildOptions | None = None, log: Log = lambda _msg: None,
                    progress: Progress | None = None) -> Plan:
    """Build an extracted split for ``targets`` and write ``out_dir`` with ``files`` and
    ``reference.json`` (``source``: how to load the original model again)."""
    plan = ex.plan(targets, strategy, label(source), source.get("output_names"))
    return artifacts.write(out_dir, plan, ex.modules, ex.weights,
                           options=options or BuildOptions(),
                           files={**(files or {}),
                                  REFERENCE_FILE: json.dumps(dict(source), indent=1)}, log=log,
                           progress=progress)


def check_inputs(imported: frontend.ImportedModel, calibration, log: Log) -> np.ndarray:
    """Inputs to check devices that are not exact on: the calibration data, else 256 seeded
    random inputs."""
    if calibration is not None:
        x, y = load_data(calibration)
        check_examples(imported.mod, x, y)
        log(f"checking the fixed-point pieces on {calibration}")
        return x
    shape = imported.input_shapes[0]
    log("checking the fixed-point pieces on 256 seeded random inputs (give --calibration for "
        "real data)")
    return np.random.default_rng(0).standard_normal((256, *shape[1:])).astype("float32")


def compile_imported(mod: tvm.IRModule, out_dir: str | Path, devices: list[str], strategy: str,
                     *, source: dict, spares: int = 0, cluster: Cluster | None = None,
                     log: Log = lambda _msg: None) -> Plan:
    """Split an already imported module with one registered strategy (devices alike, or the
    ``cluster``'s: names, memory caps, links) and write its artifacts; with ``spares``, the
    fallback plans too (as :func:`compile_model`)."""
    started = time.perf_counter()
    cluster = cluster or Cluster.uniform(devices)
    check_request(cluster, strategy, spares)
    chosen = strategies.get(strategy)
    split = chosen.split(mod, strategies.Context(len(cluster.devices), None, cluster, {}, log))
    ex = extract(split.module, [d.name for d in cluster.devices])
    planned = time.perf_counter()
    fallbacks = fallback.plan_fallbacks(
        mod, cluster, [i for i, d in enumerate(cluster.devices) if d.name in ex.modules],
        strategy, spares, speeds=None, source=label(source), log=log) if spares else []
    fallbacks_planned = time.perf_counter()
    plan = write_extracted(out_dir, ex, cluster.targets, chosen.name, source,
                           files=split.files, log=log)
    if fallbacks:
        write_fallbacks(out_dir, plan, fallbacks, cluster, spares, source, BuildOptions(),
                        (planned - started) + (time.perf_counter() - fallbacks_planned),
                        fallbacks_planned - planned, log)
    return plan


def recompile(out_dir: str | Path, split: strategies.Split, *, log: Log = lambda _msg: None
              ) -> Plan:
    """Build ``split`` again over a compiled plan's devices (same names, targets, strategy
    and source) — ``splitc finetune`` after training a branch model."""
    out = Path(out_dir)
    plan = Plan.load(out)
    source = read_source(out)
    ex = extract(split.module, [d.name for d in plan.devices])
    return write_extracted(out, ex, [d.target for d in plan.devices], plan.strategy, source,
                           files=split.files, log=log)


def model_file(model: str, out_dir: str | Path) -> dict:
    """Where a model file is, for ``reference.json``: absolute, and relative to the output
    folder (so the folder and the model can move together); nothing for zoo names and
    factories."""
    path = Path(model).expanduser()
    if not path.is_file():
        return {}
    return {"model_path": str(path.resolve()),
            "model_relative": os.path.relpath(path.resolve(), Path(out_dir).resolve())}


def resolve_model(source: Mapping, out_dir: str | Path) -> str:
    """The model a compiled plan came from: a model file where the output folder says it is
    (relative to the folder first, then the absolute path it was compiled from), or the zoo
    name / factory it was given as. A file that is gone is an error naming where it looked."""
    if "model_path" not in source:
        return source["model"]
    relative = Path(out_dir) / source.get("model_relative", "")
    for candidate in (relative, Path(source["model_path"])):
        if candidate.is_file():
            return str(candidate)
    raise SplitcError(f"the model {Path(out_dir)} was compiled from is gone: neither "
                      f"{relative} nor {source['model_path']} exists (move it back, or "
                      "compile again)")


def read_source(out_dir: str | Path) -> dict:
    path = Path(out_dir) / REFERENCE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitcError(f"{path} is missing: cannot find the original model") from None
    except ValueError as e:
        raise SplitcError(f"{path} is not readable: {e}") from None


def load_original(out_dir: str | Path) -> frontend.ImportedModel:
    """The model a compiled plan was made from, imported again."""
    source = read_source(out_dir)
    shapes = {k: tuple(v) for k, v in source["input_shapes"].items()} or None
    return frontend.load(resolve_model(source, out_dir), shapes, tiny=source["tiny"])


def load_reference(out_dir: str | Path):
    """What a compiled plan must compute, to compare the split's answers against: the original
    model, or what the plan's strategy says (a branch plan: the branch model with its
    distilled weights) — anything with ``reference(inputs) -> outputs``."""
    plan = Plan.load(out_dir)
    return strategies.get(plan.strategy).reference(Path(out_dir), load_original(out_dir))


def device_modules(out_dir: str | Path) -> dict[str, tvm.IRModule]:
    """The pieces of a compiled plan as Relax, one module per target (all devices of a target
    merged, so a kernel several pieces share appears once): the model re-imported and split
    again exactly as the compile did (its strategy re-creates its split)."""
    out = Path(out_dir)
    plan = Plan.load(out)
    mod = load_original(out).mod
    split_mod = strategies.get(plan.strategy).recreate(mod, len(plan.devices), out)
    ex = extract(split_mod, [d.name for d in plan.devices])
    merged: dict[str, tvm.IRModule] = {}
    for dev in plan.devices:
        module = ex.modules.get(dev.name)
        if module is None:
            continue
        target = merged.setdefault(dev.target, tvm.IRModule())
        for gv, func in module.functions.items():
            target[gv.name_hint] = func
    return merged


#: The model whose plans :func:`measure_runtime_cost` serves: small, so that the runtime's own
#: work is a large share of a request's, and splitting it spatially makes many messages.
RUNTIME_COST_MODEL = "resnet18"
#: The mean message size (bytes) some worker's messages must reach for the runtime's cost per
#: byte to be fitted rather than taken from the cost model's default.
BYTES_TO_PRICE = 64 << 10


def measure_runtime_cost(target: str = "host", requests: int = 40, log: Log = lambda _m: None,
                         progress: Progress | None = None, model: str = RUNTIME_COST_MODEL,
                         tiny: bool = True,
                         input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """The CPU the ZeroMQ runtime's serving thread spends per message it sends or receives,
    per byte of them and per piece it runs, beside the pieces themselves, on this machine:
    local workers serve ``model`` (default the tiny ResNet-18) whole (one worker) and split
    by rows two and four ways, and report their own counters: the serving thread's CPU time
    (polls included), its pieces', the part spent taking messages in and sending them, its
    messages, their bytes and its pieces run. The cost per message and per byte is fitted
    over the workers to the messages' part; the rest (finding what a message made ready,
    routing and keeping outputs, the polls) is priced per piece run. (The polls add 0-5 %
    back to back; a device idle between its messages, as a time-dilated one is, spends
    10-30 % of its runtime CPU in them.)
    Returns the table's ``seconds_per_message``, ``runtime_seconds_per_byte``,
    ``runtime_seconds_per_piece`` and how they were measured."""
    if target_registry.get(target).cross_compiler:
        raise SplitcError(f"measuring the runtime runs it here; {target} code does not run on "
                          "this machine")
    tell = progress or (lambda _f, _what: None)
    imported = frontend.load(model, input_shapes, tiny=tiny)
    x = imported.random_inputs()
    # per worker: messages, their bytes, pieces run, CPU on messages, the rest beside pieces
    rows = []
    layouts = (("pipeline", 1), ("spatial", 2), ("spatial", 4))
    with tempfile.TemporaryDirectory(prefix="splitc-runtime-cost-") as tmp:
        for i, (strategy, n) in enumerate(layouts):
            tell(i / len(layouts), f"compiling {model} for {n} worker(s)")
            out = Path(tmp) / f"{strategy}-{n}"
            compile_model(model, out, [target] * n, strategy, tiny=tiny,
                          input_shapes=input_shapes)
            tell((i + 0.5) / len(layouts), f"serving {requests} requests on {n} local worker(s)")
            with connect(out, timeout=120) as session:
                for _ in range(3):
                    session.infer(*x)  # warm
                before = session.worker_stats()
                for _ in range(requests):
                    session.infer(*x)
                after = session.worker_stats()
            for dev, s in after.items():
                b = before[dev]
                on_messages = s["message_cpu_s"] - b["message_cpu_s"]
                rows.append((_grown(s, b, "messages"), _grown(s, b, "bytes"),
                             s["pieces_run"] - b["pieces_run"], on_messages,
                             (s["thread_cpu_s"] - b["thread_cpu_s"])
                             - (s["piece_cpu_s"] - b["piece_cpu_s"]) - on_messages))
    tell(1.0, "done")
    counts, nbytes, pieces, on_messages, rest = (np.array(c, dtype=float)
                                                 for c in zip(*rows, strict=True))
    # messages' CPU = messages x per message + bytes x per byte, fitted over the workers; a
    # negative per-byte term (noise on messages of one size) is dropped. Where no worker's
    # messages average BYTES_TO_PRICE, their bytes cannot tell a per-byte cost from the noise
    # (the tiny model's, a few hundred bytes, made one of 6-13 ns, a copy's 10-50x, from the
    # one worker whose input is 12 kB): the default's is taken and the messages priced on it
    told = float((nbytes / np.maximum(counts, 1)).max()) >= BYTES_TO_PRICE
    if told:
        (per_message, per_byte), *_ = np.linalg.lstsq(np.stack([counts, nbytes], 1),
                                                      on_messages, rcond=None)
    if not told or per_byte < 0 or per_message < 0:
        per_byte = DEFAULT_RUNTIME_SECONDS_PER_BYTE if not told else 0.0
        per_message = max(0.0, float((on_messages - nbytes * per_byte).sum()
                                     / max(counts.sum(), 1)))
    per_piece = max(0.0, float(rest.sum() / max(pieces.sum(), 1)))
    messages = int(counts.sum())
    log(f"the runtime: {per_message * 1e6:.0f} us of CPU per message + {per_byte * 1e12:.0f} ps "
        f"per byte + {per_piece * 1e6:.0f} us per piece ({messages} messages, "
        f"{int(pieces.sum())} pieces, {(on_messages.sum() + rest.sum()) * 1e3:.1f} ms beside "
        "the pieces)")
    return {"seconds_per_message": float(per_message),
            "runtime_seconds_per_byte": float(per_byte),
            "runtime_seconds_per_piece": per_piece,
            "runtime_measured_on": f"{'the tiny ' if tiny else ''}{model} on 1, 2 and 4 local "
                                   f"workers, {messages} messages of {int(nbytes.sum()):,} "
                                   f"bytes, {int(pieces.sum())} pieces"
                                   + ("" if told else "; per byte the default's (messages too "
                                      "small to tell)")}


def _grown(after: dict, before: dict, key: str) -> int:
    """How much a worker's ``key`` (messages, bytes) grew between two of its stats, received
    and sent, over every peer."""
    return sum(v[key] - before[way].get(peer, {}).get(key, 0)
               for way in ("recv", "sent") for peer, v in after[way].items())
