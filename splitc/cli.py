"""The ``splitc`` command line.

Every command turns a user mistake (missing file, unknown device, bad shape...) into one line on
stderr and exit code 2; a traceback means a bug in splitc.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from splitc import cli_runtime
from splitc.errors import SplitcError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile a model into per-device pieces and run them across a cluster.")

ModelArg = Annotated[str, typer.Argument(
    help="A zoo model name (see `splitc zoo`), an .onnx file, a .pt2 ExportedProgram, or "
         "package.module:factory returning a torch module.")]
ShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", help="Pin an input's shape: NAME=1,3,224,224 (repeatable).")]
TinyOpt = Annotated[bool, typer.Option(
    "--tiny", help="For zoo models: the narrow 32x32 variant with the same topology.")]


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``["x=1,3,8,8"]`` → ``{"x": (1, 3, 8, 8)}``, or a SplitcError naming the bad item."""
    if not items:
        return None
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise SplitcError(f"--input-shape {item!r}: expected NAME=D1,D2,... with positive "
                              "integers, e.g. input=1,3,224,224")
        shapes[name] = shape
    return shapes


ClusterOpt = Annotated[Path | None, typer.Option(
    "--cluster", help="A cluster description (TOML or JSON): devices, memory caps, links.")]
ObjectiveOpt = Annotated[str, typer.Option(
    help="What --strategy auto minimises: latency (one request) or throughput (pipelined).")]


def load_cluster(cluster: Path | None, devices: str | None):
    from splitc.planning.cluster import Cluster

    if cluster is not None:
        return Cluster.load(cluster)
    names = [d.strip() for d in ("host,host" if devices is None else devices).split(",")]
    if not all(names):
        raise SplitcError(f"--devices {devices!r}: give target names separated by commas, "
                          "e.g. host,host (see `splitc targets`)")
    return Cluster.uniform(names)


def strategy_help() -> str:
    """``--strategy``'s help: the registered strategies (read from the registry when the
    command is one that loads the compiler anyway; other commands stay light)."""
    if sys.argv[1:2] in (["compile"], ["plan"]):
        from splitc.planning import strategies

        listed = strategies.describe()
    else:
        listed = "pipeline | channel | spatial | branch (see `splitc compile --help`)"
    return f"How to split: {listed} | auto (the cost model chooses among them)."


def predicted_trace(plan, path: Path, cluster_file: Path | None) -> Path:
    """Write the cost model's timeline of one request of a compiled ``plan``: its devices in
    order, from ``cluster_file`` when given (names, speeds, links), else at their targets'
    profiled speeds on the default network."""
    from splitc.planning.cluster import Cluster
    from splitc.planning.cost import estimate
    from splitc.planning.speeds import cluster_speeds
    from splitc.runtime.trace import Timeline

    spec = (load_cluster(cluster_file, None) if cluster_file is not None
            else Cluster.uniform([d.target for d in plan.devices]))
    if len(spec.devices) != len(plan.devices):
        raise SplitcError(f"--cluster {cluster_file} has {len(spec.devices)} devices, the plan "
                          f"{len(plan.devices)}")
    with progress_bar("profiling") as tell:
        speeds = cluster_speeds(spec, log=lambda m: typer.echo(m, err=True), progress=tell)
    timeline = Timeline()
    estimate(plan, spec, list(speeds), timeline=timeline)
    return timeline.write(path, f"predicted: {plan.strategy} split of {plan.source}")


@contextlib.contextmanager
def progress_bar(what: str):
    """Yields ``tell(fraction done, text)``; the first call shows a rich progress bar on
    stderr (with its time elapsed and left), and nothing shows if it is never called."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    state: dict = {}

    def tell(fraction: float, text: str) -> None:
        if "bar" not in state:
            bar = Progress(TextColumn("{task.description}"), BarColumn(),
                           TextColumn("{task.percentage:>3.0f} %"), TimeElapsedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[now]}"),
                           console=Console(stderr=True), transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task(what, total=1.0, now="")
        state["bar"].update(state["task"], completed=fraction, now=text)

    try:
        yield tell
    finally:
        if "bar" in state:
            state["bar"].stop()


@app.command()
def compile(
    model: ModelArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    devices: Annotated[str | None, typer.Option(
        help="Comma-separated target names, one per device (see `splitc targets`); "
             "default host,host. Ignored with --cluster.")] = None,
    strategy: Annotated[str, typer.Option(help=strategy_help())] = "pipeline",
    cluster: ClusterOpt = None,
    objective: ObjectiveOpt = "latency",
    input_shape: ShapeOpt = None,
    tiny: TinyOpt = False,
    tuning_db: Annotated[Path | None, typer.Option(
        help="Folder of tuning databases (`splitc tune --db`); kernels with a record use it, "
             "the rest the default schedules. Default: the databases shipped with splitc.")]
        = None,
    sync: Annotated[str, typer.Option(
        help="--strategy branch: which candidate layers stay sync points (exchange "
             "activations): all (exact) | none (fewest bytes) | a weight-mass budget in [0, 1] "
             "(cut the layers that save the most bytes per weight dropped).")] = "none",
    calibration: Annotated[str | None, typer.Option(
        help="--strategy branch: training data (.npz with x and y, a folder, or "
             "module:function). Searches the sync points instead of --sync: the fewest bytes "
             "whose distilled branch model stays within --max-accuracy-drop.")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(
        help="With --calibration: points of held-out top-1 the branch model may lose.")]
        = 1.0,
    epochs: Annotated[int, typer.Option(
        min=0, help="With --calibration: distillation epochs per policy tried, after its cut "
                    "layers are refitted (0: refit only).")] = 30,
    fpga_precision: Annotated[str, typer.Option(
        help="FPGA targets: hls4ml fixed-point type of weights and activations.")]
        = "ap_fixed<16,6>",
    fpga_reuse: Annotated[int | None, typer.Option(
        min=1, help="FPGA targets: hls4ml reuse factor (multiplications per multiplier) for "
                    "every layer; default: per layer, the fastest that fits the part.")] = None,
    fpga_min_agreement: Annotated[float, typer.Option(
        help="FPGA targets: refuse a precision whose top-1 agreement with float on the "
             "calibration data (--calibration, else random inputs) is lower.")] = 0.99,
    spares: Annotated[int, typer.Option(
        min=0, help="Also compile a fallback plan for every loss of up to this many of the "
                    "plan's devices, over the devices left (the same strategy, or auto's "
                    "search), into the same folder: `splitc run` switches to it when a "
                    "device stays down (--failover-after). Default 0: none.")] = 0,
) -> None:
    """Split MODEL across devices and write one artifact folder per device plus plan.json."""
    from splitc.backend.fpga import FpgaOptions
    from splitc.driver import compile_model

    fpga = FpgaOptions(fpga_precision, fpga_reuse, fpga_min_agreement)
    fpga.width()  # a malformed precision is refused before any work
    with progress_bar("compiling") as tell:
        plan = compile_model(model, out, strategy=strategy,
                             cluster=load_cluster(cluster, devices), objective=objective,
                             input_shapes=parse_shapes(input_shape), tiny=tiny,
                             tuning_db=tuning_db, sync=parse_sync(sync),
                             calibration=calibration, max_accuracy_drop=max_accuracy_drop,
                             epochs=epochs, fpga=fpga, spares=spares,
                             log=lambda m: typer.echo(m, err=True), progress=tell)
    n = len(plan.devices)
    typer.echo(f"wrote {out}/plan.json: {plan.strategy} split, {n} device{'s' * (n != 1)}, "
               f"{len(plan.pieces)} pieces, {len(plan.transfers)} transfers, "
               f"{plan.transfer_bytes:,} bytes between devices per inference")
    if spares:
        from splitc.runtime import fallback

        index = fallback.read_index(out)
        seconds, size = index["compile_seconds"], index["bytes"]
        typer.echo(f"wrote {len(index['plans'])} fallback plan(s) for losing up to {spares} "
                   f"device(s) ({', '.join(p['name'] for p in index['plans'])}): "
                   f"+{seconds['fallbacks']:.1f} s to compile (main plan {seconds['main']:.1f}"
                   f" s), +{size['fallbacks'] / 2**20:.2f} MiB on disk (main plan "
                   f"{size['main'] / 2**20:.2f} MiB)")


def parse_sync(text: str) -> str | float:
    if text in ("all", "none"):
        return text
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not 0.0 <= budget <= 1.0:
        raise SplitcError(f"--sync {text!r}: give all, none, or a budget between 0 and 1")
    return budget


@app.command()
def finetune(
    out: Annotated[Path, typer.Argument(help="A folder from `splitc compile --strategy branch`.")],
    data: Annotated[str, typer.Option(
        help="Training data: a .npz with x (and y labels), a folder of .npz/.npy files, or "
             "module:function returning a torch Dataset.")],
    epochs: Annotated[int, typer.Option(
        min=0, help="Training epochs after the cut layers are refitted (0: refit only).")] = 30,
    lr: Annotated[float, typer.Option(help=(
        "Adam learning rate (halved, and the epoch started again from its first weights, "
        "each time a step's loss passes 20x the first step's)."))] = 2e-3,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    max_accuracy_drop: Annotated[float, typer.Option(
        help="Points of held-out top-1 the branch model may lose against the original; more "
             "fails the command (exit 1), the weights are still written.")] = 1.0,
    seed: int = 0,
) -> None:
    """Distil the original model into a branch plan's branches and rebuild its artifacts.

    The original model is the teacher; the branch model (the plan's rewrite of it) the
    student. 20 % of the data is held out to report accuracy before and after. Uses a GPU
    when torch sees one.
    """
    from splitc.backend.torch_program import TorchProgram, check_trainable
    from splitc.driver import load_reference, recompile
    from splitc.frontend.data import check_examples, load_data
    from splitc.planning import strategies
    from splitc.planning.distill import distill
    from splitc.planning.strategies.branch import BranchReference

    reference = load_reference(out)
    if not isinstance(reference, BranchReference):
        raise SplitcError(f"{out} is not a branch plan: compile with --strategy branch first")
    x, y = load_data(data)
    check_examples(reference.original.mod, x, y)
    check_trainable(reference.original.mod)  # (before any training: exit 2 naming the ops)
    check_trainable(reference.student_mod)
    student = reference.program()
    with progress_bar("distilling") as tell:
        report = distill(TorchProgram(reference.original.mod), student, x, y, epochs=epochs,
                         lr=lr, batch=batch, seed=seed, log=lambda m: typer.echo(m, err=True),
                         progress=tell, plan=reference.plan)
    recompile(out, strategies.get("branch").trained(reference.original.mod, reference.plan,
                                                     student),
              log=lambda m: typer.echo(m, err=True))
    drop = (report.teacher - report.after) * 100
    typer.echo(f"{report.metric}: original {report.teacher:.4f}, branch model before "
               f"{report.before:.4f}, refitted {report.reconstructed:.4f}, after "
               f"{report.after:.4f} (drop {drop:.2f} points); "
               f"wrote {out}")
    if drop > max_accuracy_drop:
        typer.echo(f"the branch model loses {drop:.2f} points, more than --max-accuracy-drop "
                   f"{max_accuracy_drop}: keep more sync points (--sync all, or a smaller "
                   "budget) or train longer", err=True)
        raise typer.Exit(1)


@app.command()
def plan(
    model: ModelArg,
    devices: Annotated[str | None, typer.Option(
        help="Comma-separated target names (default host,host). Ignored with --cluster.")]
        = None,
    cluster: ClusterOpt = None,
    objective: ObjectiveOpt = "latency",
    explain: Annotated[bool, typer.Option(
        help="Show every candidate with its predicted cost, why the best won, and the bytes "
             "a branch plan would send against the channel plan and the best exact plan.")]
        = False,
    trace: Annotated[Path | None, typer.Option(
        help="Write the best plan's predicted timeline here (Chrome Trace Event JSON: open in "
             "ui.perfetto.dev; `splitc run --trace` writes the measured one).")] = None,
    input_shape: ShapeOpt = None,
    tiny: TinyOpt = False,
) -> None:
    """Search for the best split of MODEL on a cluster (no compile)."""
    from splitc import frontend
    from splitc.planning.search import branch_savings, search
    from splitc.planning.speeds import cluster_speeds

    spec = load_cluster(cluster, devices)
    imported = frontend.load(model, parse_shapes(input_shape), tiny=tiny)
    with progress_bar("profiling") as tell:
        speeds = cluster_speeds(spec, log=lambda m: typer.echo(m, err=True), progress=tell)
    result = search(imported.mod, spec, speeds, objective=objective, source=model)
    best = result.best
    typer.echo(f"best: {best.label}: predicted latency {best.estimate.latency * 1e3:.2f} ms, "
               f"throughput {best.estimate.throughput:.1f}/s, "
               f"{best.estimate.transfer_bytes:,} bytes per inference")
    if explain:
        typer.echo(result.explain(spec))
        typer.echo(branch_savings(imported.mod, result))
    if trace is not None:
        from splitc.planning.search import predicted_timeline

        path = predicted_timeline(best, spec, result.speeds).write(
            trace, f"predicted: {best.label}, {model}")
        typer.echo(f"wrote {path} (the predicted timeline of {best.label})")


@app.command()
def profile(
    target: Annotated[str, typer.Option(help="The target to measure (runs here).")] = "host",
    model: Annotated[str, typer.Option(help="The model whose layers are timed.")] = "resnet18",
    tiny: TinyOpt = False,
    output: Annotated[Path | None, typer.Option(
        help="Where to store the table (default: where the cost model looks).")] = None,
    tile_ways: Annotated[int, typer.Option(
        min=2, help="Fit the spatial tiles' cost on splits this many ways (your cluster's "
                    "device count: thin tiles run further below the rates).")] = 2,
) -> None:
    """Time compiled layers on this machine and store the speed table the cost model uses."""
    from splitc.driver import measure_runtime_cost
    from splitc.planning import profiler

    with progress_bar(f"profiling {target}") as tell:
        table = profiler.measure(model, target, tiny=tiny, progress=tell, tile_ways=tile_ways)
    with progress_bar(f"measuring the runtime on {target}") as tell:
        table.update(measure_runtime_cost(target, progress=tell, model=model, tiny=tiny))
    path = profiler.save(table, output)
    typer.echo(profiler.describe(table))
    typer.echo(f"wrote {path}")


@app.command()
def tune(
    model: Annotated[str, typer.Argument(
        help="A model (as for compile), or a folder from `splitc compile`: then the pieces of "
             "its devices of --target are tuned, each distinct kernel once.")],
    db: Annotated[Path | None, typer.Option(
        help="Folder of tuning databases; records go to DB/<target key>/ (resumable). "
             "Default: the schedules kept for this target (or this CPU) in the cache, which "
             "every compile uses without --tuning-db.")] = None,
    target: Annotated[str, typer.Option(
        help="The target to tune for: the host here, a board through --rpc.")] = "host",
    trials: Annotated[int, typer.Option(
        help="MetaSchedule trials over all kernels after the quick selection (0: only the "
             "selection: each kernel's handful of default-schedule candidates measured).")]
        = 64,
    rpc: Annotated[str | None, typer.Option(
        help="An RPC tracker HOST:PORT; candidates are cross-compiled here and timed on a "
             "board serving `splitc tune-agent --tracker HOST:PORT --key KEY`.")] = None,
    key: Annotated[str | None, typer.Option(
        help="With --rpc: the key the boards registered under (default: the target name).")]
        = None,
    input_shape: ShapeOpt = None,
    tiny: TinyOpt = False,
) -> None:
    """Select and tune kernels for a target; compiles then use the records.

    First each kernel's handful of default-schedule candidates (tiles, loop orders) is measured
    on the device and kept as records, so a database never makes a kernel slower than the
    default schedule; then MetaSchedule searches for --trials more. Records match kernels by
    structure, so they serve every model and split piece with the same kernel. Without --db
    they go where compiles look first (for a board: after `splitc tune --target rpi4 --rpc
    ...`, every compile for rpi4 uses them; the host selects its own on first compile).
    """
    import tvm

    from splitc import frontend
    from splitc import targets as registry
    from splitc.backend import tuning, tuning_db
    from splitc.passes.ir import lift_weights

    if trials < 0:
        raise SplitcError("--trials must be 0 or more")
    spec = registry.get(target)
    remote = tuning.Rpc.parse(rpc, key or spec.name) if rpc else None
    if Path(model).is_dir() and (Path(model) / "plan.json").exists():
        from splitc.driver import device_modules

        modules = device_modules(Path(model))
        if target not in modules:
            raise SplitcError(f"{model} has no device of target {target} (its targets: "
                              f"{', '.join(sorted(modules)) or 'none'})")
        module = modules[target]
    else:
        imported = frontend.load(model, parse_shapes(input_shape), tiny=tiny)
        func, _ = lift_weights(imported.mod["main"])
        module = tvm.IRModule({"main": func})
    with progress_bar(f"tuning {spec.name}") as tell:
        rows = tuning.tune(module, spec, db, trials, log=lambda m: typer.echo(m, err=True),
                           rpc=remote, progress=tell)
    if not rows:
        raise SplitcError("the model has no kernel with a reduction to tune")
    typer.echo(f"{'kernel':<44} {'default':>10} {'selected':>10} {'best':>10}  choice")
    for r in rows:
        typer.echo(f"{r['kernel'][:44]:<44} {tuning._ms(r['default_s']):>10} "
                   f"{tuning._ms(r['selected_s']):>10} {tuning._ms(r['best_s']):>10}  "
                   + (r["choice"] or ("(kept)" if r["reused"] else "-")))
    root = db if db is not None else tuning_db.selection_root()
    typer.echo(f"wrote {Path(root) / tuning_db.target_key(spec)}")


@app.command(name="tune-agent")
def tune_agent(
    tracker: Annotated[str, typer.Option(help="The RPC tracker, HOST:PORT.")],
    key: Annotated[str, typer.Option(help="The key to register under (the target name).")],
    port: Annotated[int, typer.Option(help="First port to listen on.")] = 9090,
) -> None:
    """Serve this board to `splitc tune --rpc` (TVM's RPC server, runtime library only).

    On a board without the compiler extras: `python -m splitc.runtime.tune_agent`.
    """
    from splitc.runtime import tune_agent as agent

    code = agent.main(["--tracker", tracker, "--key", key, "--port", str(port)])
    if code:
        raise typer.Exit(code)


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="A compiled output folder, or a model.")],
    draw: Annotated[Path | None, typer.Option(
        help="For an output folder: draw devices, pieces and transfers to this .svg file.")]
        = None,
    trace: Annotated[Path | None, typer.Option(
        help="For an output folder: write the cost model's predicted timeline of this plan "
             "here (Chrome Trace Event JSON; `splitc run --trace` writes the measured one). "
             "Devices at their targets' speeds (profiled on first use), links as --cluster "
             "gives, else the default network.")] = None,
    cluster: ClusterOpt = None,
    input_shape: ShapeOpt = None,
    tiny: TinyOpt = False,
) -> None:
    """Show a plan's summary, or a model's layer table (FLOPs, params, activation sizes)."""
    from splitc import report

    path = Path(target)
    if path.is_dir() and (path / "plan.json").exists():
        from splitc.runtime.plan import Plan

        plan_value = Plan.load(path)
        typer.echo(report.plan_summary(plan_value))
        if draw is not None:
            from splitc.draw import draw as draw_plan

            typer.echo(f"wrote {draw_plan(plan_value, draw)}")
        if trace is not None:
            typer.echo(f"wrote {predicted_trace(plan_value, trace, cluster)} (the predicted "
                       "timeline of this plan)")
    else:
        for flag, value in (("--draw", draw), ("--trace", trace)):
            if value is not None:
                raise SplitcError(f"{flag} needs a compiled output folder (splitc compile ... "
                                  "-o OUT)")
        from splitc import frontend

        imported = frontend.load(target, parse_shapes(input_shape), tiny=tiny)
        typer.echo(report.layer_table(imported.mod))


@app.command()
def targets() -> None:
    """List the targets splitc can compile for."""
    from splitc import targets as registry

    typer.echo(registry.describe_table())


@app.command()
def zoo() -> None:
    """List the models built into splitc (usable wherever a model path is)."""
    from splitc.frontend import zoo as models

    for name in models.names():
        typer.echo(name)


cli_runtime.register(app)  # serve, run: the ZeroMQ runtime


def main() -> None:
    """The ``splitc`` entry point: every failure exits non-zero — 2 for bad input (one line
    naming the cause), 1 for a failed check or a fault on the cluster."""
    from splitc.runtime.errors import BadInput, RuntimeFailure
    from splitc.targets import TargetError

    try:
        code = app(standalone_mode=False)
    except (SplitcError, BadInput, TargetError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RuntimeFailure as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors (typer's) carry their own exit code
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    # (without standalone mode click returns a command's exit code instead of exiting)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
