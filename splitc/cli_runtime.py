"""``splitc serve`` and ``splitc run``: the ZeroMQ runtime on the command line.

Register both on the main app with :func:`register` (or ``app.command()(serve)``). A board
without typer can run the same worker with ``python -m splitc.runtime.worker``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from splitc.errors import SplitcError


def serve(
    device_folder: Annotated[Path, typer.Argument(
        help="One device's folder from `splitc compile` (OUT/dev0): its library, weights "
             "and plan.json.")],
    bind: Annotated[str, typer.Option(
        help="ZeroMQ endpoint to listen on; tcp://0.0.0.0:5555 listens on every interface.")]
        = "tcp://127.0.0.1:5555",
    keys: Annotated[Path | None, typer.Option(
        help="This device's key folder from `splitc keys` (KEYDIR/<device>): encrypt every "
             "connection and admit only known keys. Required off loopback.")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Serve off loopback without keys: tensors cross the network in the clear.")]
        = False,
    restart: Annotated[bool, typer.Option(
        help="Restart the worker on the same endpoint whenever it dies (clients reconnect "
             "by themselves).")] = False,
    max_message_bytes: Annotated[int | None, typer.Option(
        help="Close connections that send larger frames (default: twice the largest tensor "
             "this device receives, at least 1 MiB); the worker's memory bound does not rely "
             "on it.")] = None,
    max_connections: Annotated[int | None, typer.Option(
        help="Connections held at once (default: 64, or every device and a few strangers for "
             "bigger plans).")] = None,
    compute_priority: Annotated[str, typer.Option(
        help="idle: pieces run at SCHED_IDLE, so tensors leave the moment they are sent; "
             "normal: where other busy processes share the board.")] = "idle",
    fpga: Annotated[str, typer.Option(
        help="An FPGA device's pieces: emulation (the bit-accurate C simulation) or board "
             "(the PYNQ overlay, on the board).")] = "emulation",
    announce: Annotated[Path | None, typer.Option(
        help="Write the bound endpoint to this file once listening (for a * port).")] = None,
) -> None:
    """Serve one device's pieces until SIGTERM or Ctrl-C (run this on every board).

    Logs to stderr: where it listens, each session, and every error it reports.
    """
    from splitc.runtime import worker

    options = worker.WorkerOptions(
        str(device_folder), bind, announce=str(announce) if announce else None,
        keys=str(keys) if keys else None, insecure=insecure,
        max_message_bytes=max_message_bytes, max_connections=max_connections,
        restart=restart, fpga=fpga,
        compute_priority=compute_priority)
    code = worker.run(options)
    if code:
        raise typer.Exit(code)


def keys(
    keydir: Annotated[Path, typer.Argument(help="Folder to write the keys to.")],
    plan: Annotated[Path | None, typer.Option(
        help="A folder from `splitc compile`: make keys for its devices and the client.")]
        = None,
    names: Annotated[str | None, typer.Option(
        help="Comma-separated names to make keys for instead (device names, and client).")]
        = None,
    force: Annotated[bool, typer.Option(help="Replace keys that exist.")] = False,
) -> None:
    """Make CurveZMQ key pairs: one per device and one for the client.

    Writes KEYDIR/<name>/ for each: its own secret key and every public key. Copy
    KEYDIR/<device> to that device's board and start it with `splitc serve --keys`; give the
    client `--keys KEYDIR/client`. Anyone without one of these keys is refused before anything
    runs, and no tensor crosses the network in the clear.
    """
    from splitc.runtime import security
    from splitc.runtime.plan import Plan

    if (plan is None) == (names is None):
        raise SplitcError("give --plan OUT (keys for its devices and the client) or --names")
    if plan is not None:
        who = [d.name for d in Plan.load(plan).devices] + [security.CLIENT]
    else:
        who = [n.strip() for n in names.split(",") if n.strip()]
        bad = [n for n in who if not n.replace("-", "").replace("_", "").isalnum()]
        if not who or bad:
            raise SplitcError(f"--names: give names made of letters, digits, - and _ "
                              f"(bad: {', '.join(bad) or 'none given'})")
    folders = security.generate(keydir, who, force=force)
    for name, folder in folders.items():
        typer.echo(f"{name:>10}: {folder}")
    typer.echo(f"copy each device's folder to its board (`splitc serve OUT/<device> --keys "
               f"{keydir}/<device>`); the client uses --keys {folders.get('client', keydir)}")


def parse_endpoints(text: str) -> dict[str, str]:
    """``"dev0=tcp://a:5555,dev1=tcp://b:5555"`` → ``{"dev0": "tcp://a:5555", ...}``."""
    endpoints = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        device, sep, endpoint = item.partition("=")
        if not sep or not device.strip() or "://" not in endpoint:
            raise SplitcError(f"--endpoints {item!r}: expected DEVICE=ENDPOINT items separated "
                              "by commas, e.g. dev0=tcp://10.0.0.2:5555,dev1=tcp://10.0.0.3:5555")
        endpoints[device.strip()] = endpoint.strip()
    if not endpoints:
        raise SplitcError("--endpoints is empty: give DEVICE=ENDPOINT items")
    return endpoints


def run(
    out: Annotated[Path, typer.Argument(help="A folder written by `splitc compile`.")],
    input: Annotated[list[Path] | None, typer.Option(
        "--input", help="The model's inputs: one .npy per input (in the model's input order), "
                        "one .npz holding each by name, or an image file (resized to the "
                        "input's height and width, scaled to [0, 1], then --mean/--std). "
                        "Default: seeded random values (another seed per request).")]
        = None,
    mean: Annotated[str, typer.Option(
        help="Images: the mean to subtract per channel, e.g. 0.485,0.456,0.406.")] = "0",
    std: Annotated[str, typer.Option(
        help="Images: the standard deviation to divide by, e.g. 0.229,0.224,0.225.")] = "1",
    output: Annotated[Path | None, typer.Option(help="Write the first output here (.npy).")]
        = None,
    trace: Annotated[Path | None, typer.Option(
        help="Write the run's timeline here (Chrome Trace Event JSON: open in ui.perfetto.dev): "
             "every piece, message and wait of every request, per device, and the client's; "
             "`splitc plan --trace` writes the predicted one.")] = None,
    check: Annotated[bool, typer.Option(
        help="Compare every request's outputs with the original model (ONNX Runtime or "
             "torch); a difference beyond the tolerance fails the command (exit 1).")] = False,
    rtol: Annotated[float, typer.Option(
        help="--check: relative tolerance, times the reference output's largest magnitude.")]
        = 1e-4,
    atol: Annotated[float, typer.Option(help="--check: absolute tolerance.")] = 1e-6,
    endpoints: Annotated[str | None, typer.Option(
        help="Running workers (`splitc serve`), e.g. dev0=tcp://10.0.0.2:5555,"
             "dev1=tcp://10.0.0.3:5555. Default: one local worker process per device.")]
        = None,
    requests: Annotated[int, typer.Option(
        min=1, help="Run this many requests and report latency percentiles and throughput.")]
        = 1,
    inflight: Annotated[int, typer.Option(
        min=1, max=16, help="With --requests: how many requests are in flight at once (at most "
                            "16, what a worker holds per client).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for the random default input.")] = 0,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for a request (and for workers to start).")] = 60.0,
    keys: Annotated[Path | None, typer.Option(
        help="The client's key folder from `splitc keys` (KEYDIR/client): CurveZMQ on every "
             "connection. Required for endpoints off loopback.")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Connect to endpoints off loopback without keys (tensors in the clear).")]
        = False,
    retries: Annotated[int, typer.Option(
        min=0, help="Send a request again, up to this many times, when a worker was lost or "
                    "it timed out (once the workers are back).")] = 0,
    failover_after: Annotated[float, typer.Option(
        min=0.001, help="With fallback plans (`compile --spares`): seconds a device may stay "
                        "down before every other worker switches to the plan without it "
                        "(requests in flight are sent again); the main plan runs again once "
                        "it is back.")] = 5.0,
) -> None:
    """Run a compiled plan on its devices over ZeroMQ; print what crossed between them."""
    import numpy as np

    from splitc.runtime.client import connect

    plan = load_plan_folder(out)
    batches = request_inputs(input, plan, seed, requests, parse_floats(mean, "--mean"),
                             parse_floats(std, "--std"))
    reference = None
    if check:  # before anything runs: a reference that cannot load fails at once
        from splitc.driver import load_reference

        reference = load_reference(out)
    addresses = parse_endpoints(endpoints) if endpoints is not None else None
    with connect(out, addresses, timeout=timeout, start_timeout=timeout, keys=keys,
                 insecure=insecure, retries=retries, failover_after=failover_after) as session:
        t0 = time.perf_counter()
        results = session.infer_many(batches, inflight=inflight)
        elapsed = time.perf_counter() - t0
        crossed = session.transfer_bytes()
        if trace is not None:
            session.timeline().write(trace, f"measured: {plan.strategy} split of {plan.source}"
                                            f", {requests} request(s)")
    outputs = results[0]
    where = "on local workers" if addresses is None else "on " + ", ".join(
        f"{d}={e}" for d, e in addresses.items())
    if session.retried:
        typer.echo(f"{session.retried} request(s) sent again after a fault")
    switches = [what for _, dev, what in session.events
                if dev == "*" and what.startswith("serving ")]
    if switches:
        typer.echo(f"plans switched {len(switches)} time(s): {'; '.join(switches)}")
    ran = session.plan  # (the fallback plan it ended on, if one)
    typer.echo(f"ran {len(ran.pieces)} pieces on {plural(len(session.active), 'device')} "
               f"{where}" + (f" (the fallback plan {session.serving})" if session.lost else "")
               + f"; {crossed:,} bytes crossed between devices"
               + (f" ({crossed // requests:,} per request)" if requests > 1 else ""))
    for endpoint, y in zip(plan.outputs, outputs, strict=True):
        typer.echo(f"output {endpoint.name}: {y.dtype}{list(y.shape)}")
    if requests > 1:
        ms = np.percentile(session.latencies, [50, 90, 99]) * 1e3
        typer.echo(f"{requests} requests, {inflight} in flight: latency p50 {ms[0]:.2f} ms, "
                   f"p90 {ms[1]:.2f} ms, p99 {ms[2]:.2f} ms; "
                   f"throughput {requests / elapsed:.1f} requests/s")
    if output is not None:
        np.save(output, outputs[0])
        typer.echo(f"wrote {output}")
    if trace is not None:
        typer.echo(f"wrote {trace} (the timeline of the run: open it in ui.perfetto.dev)")
    if reference is not None:
        check_requests(plan, reference, batches, results, rtol, atol)


def check_requests(plan, reference, batches, results, rtol: float, atol: float) -> None:
    """``run --check``: every request's outputs against the reference on the same inputs;
    a failure exits 1 naming the request and the output."""
    from splitc.report import compare, same_top1
    from splitc.runtime.artifact import KINDS

    what = "the branch model's" if hasattr(reference, "student_mod") else "the original's"
    fixed_point = any(not KINDS[d.kind].exact for d in plan.devices)
    failed, worst = [], None
    for i, (inputs, outputs) in enumerate(zip(batches, results, strict=True)):
        expected = reference.reference(inputs)
        for endpoint, y, r in zip(plan.outputs, outputs, expected, strict=True):
            if fixed_point:
                if not same_top1(y, r):
                    failed.append(f"request {i}, output {endpoint.name}: top-1 differs")
                continue
            c = compare(y, r, rtol=rtol, atol=atol)
            if worst is None or c.max_abs - c.tolerance > worst[1].max_abs - worst[1].tolerance:
                worst = (f"request {i}, output {endpoint.name}", c)
            if not c.passed:
                failed.append(f"request {i}, output {endpoint.name}: {c.describe()}")
    checked = f"{plural(len(batches), 'request')} checked"
    if worst is not None:
        typer.echo(f"worst ({worst[0]}): {worst[1].describe()}")
    if failed:
        for line in failed[:5]:
            typer.echo(f"check FAILED: {line}", err=True)
        typer.echo(f"check FAILED: {len(failed)} of the outputs of {checked} differ from "
                   f"{what}", err=True)
        raise typer.Exit(1)
    if fixed_point:
        typer.echo(f"check passed ({checked}): the FPGA pieces compute in fixed point; the "
                   f"top-1 is {what} on every request")
        return
    typer.echo(f"check passed ({checked}): the split gives {what} answer within rtol {rtol:g} "
               f"x max abs + atol {atol:g}")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SplitcError(f"{flag} {text!r}: give numbers separated by commas") from None
    return values


def load_plan_folder(out: Path):
    """The plan of an output folder, or an error naming what was given instead (one
    device's folder, a folder with no plan)."""
    from splitc.runtime.plan import Plan

    plan = Plan.load(out)
    parent = Path(out).resolve().parent
    if (parent / "plan.json").exists() and Path(out).name in {d.dir for d in plan.devices}:
        raise SplitcError(f"{out} is one device's folder (what a board serves); give the "
                          f"output folder of `splitc compile`, {parent}")
    return plan


def request_inputs(paths: list[Path] | None, plan, seed: int, requests: int,
                   mean: list[float], std: list[float]) -> list[list]:
    """The inputs of each request: the files given (the same for every request), or seeded
    random values (seed, seed + 1, ... for the requests)."""
    import numpy as np

    from splitc.frontend.inputs import InputSpec, load_inputs

    specs = [InputSpec(e.name, plan.tensors[e.tensor].shape, plan.tensors[e.tensor].dtype)
             for e in plan.inputs]
    if paths:
        arrays = load_inputs(paths, specs, mean=mean, std=std)
        return [arrays] * requests
    out = []
    for i in range(requests):
        rng = np.random.default_rng(seed + i)
        out.append([rng.standard_normal(s.shape).astype(s.dtype) for s in specs])
    return out


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``run`` and ``keys`` to ``app``."""
    app.command()(serve)
    app.command()(run)
    app.command()(keys)
