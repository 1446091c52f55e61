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
             "this device receives, at least 1 MiB).")] = None,
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
        max_message_bytes=max_message_bytes, restart=restart, fpga=fpga,
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
        "--input", help="Input .npy file(s), in the model's input order. Default: random.")]
        = None,
    output: Annotated[Path | None, typer.Option(help="Write the first output here (.npy).")]
        = None,
    check: Annotated[bool, typer.Option(
        help="Compare with the original model (ONNX Runtime or torch).")] = False,
    endpoints: Annotated[str | None, typer.Option(
        help="Running workers (`splitc serve`), e.g. dev0=tcp://10.0.0.2:5555,"
             "dev1=tcp://10.0.0.3:5555. Default: one local worker process per device.")]
        = None,
    requests: Annotated[int, typer.Option(
        min=1, help="Run this many requests and report latency percentiles and throughput.")]
        = 1,
    inflight: Annotated[int, typer.Option(
        min=1, help="With --requests: how many requests are in flight at once.")] = 4,
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
) -> None:
    """Run a compiled plan on its devices over ZeroMQ; print what crossed between them."""
    import numpy as np

    from splitc.runtime.client import connect
    from splitc.runtime.plan import Plan

    plan = Plan.load(out)
    arrays = load_inputs(input, plan, seed)
    addresses = parse_endpoints(endpoints) if endpoints is not None else None
    with connect(out, addresses, timeout=timeout, start_timeout=timeout, keys=keys,
                 insecure=insecure, retries=retries) as session:
        t0 = time.perf_counter()
        results = session.infer_many([arrays] * requests, inflight=inflight)
        elapsed = time.perf_counter() - t0
        crossed = session.transfer_bytes()
    outputs = results[0]
    where = "on local workers" if addresses is None else "on " + ", ".join(
        f"{d}={e}" for d, e in addresses.items())
    if session.retried:
        typer.echo(f"{session.retried} request(s) sent again after a fault")
    typer.echo(f"ran {len(plan.pieces)} pieces on {len(plan.devices)} devices {where}; "
               f"{crossed:,} bytes crossed between devices"
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
    if check:
        from splitc.driver import load_reference

        model = load_reference(out)
        reference = model.reference(arrays)
        what = "the branch model's" if hasattr(model, "student_mod") else "the original's"
        worst = 0.0
        for y, r in zip(outputs, reference, strict=True):
            err = float(np.abs(y - r).max())
            scale = float(np.abs(r).max()) or 1.0
            worst = max(worst, err / scale)
            typer.echo(f"max abs error {err:.3g} (reference max abs {scale:.3g}, "
                       f"relative {err / scale:.3g})")
        from splitc.runtime.artifact import KINDS

        if any(not KINDS[d.kind].exact for d in plan.devices):  # fixed point: compare top-1
            same = all(np.array_equal(y.reshape(y.shape[0], -1).argmax(-1),
                                      r.reshape(r.shape[0], -1).argmax(-1))
                       for y, r in zip(outputs, reference, strict=True))
            if not same:
                typer.echo("check FAILED: the FPGA plan's top-1 differs from the original's",
                           err=True)
                raise typer.Exit(1)
            typer.echo("check passed: the FPGA pieces compute in fixed point; the top-1 is "
                       f"{what} (the error is above)")
            return
        if worst > 1e-4:
            typer.echo(f"check FAILED: the split does not give {what} answer", err=True)
            raise typer.Exit(1)
        typer.echo(f"check passed: the split gives {what} answer (relative error ≤ 1e-4)")


def load_inputs(paths: list[Path] | None, plan, seed: int):
    """The model inputs: from .npy files, or seeded random values of the right shapes."""
    import numpy as np

    specs = [(e.name, plan.tensors[e.tensor]) for e in plan.inputs]
    if not paths:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(t.shape).astype(t.dtype) for _, t in specs]
    if len(paths) != len(specs):
        raise SplitcError(f"the model takes {len(specs)} inputs "
                          f"({', '.join(n for n, _ in specs)}), got {len(paths)} --input files")
    arrays = []
    for path, (name, t) in zip(paths, specs, strict=True):
        try:
            x = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise SplitcError(f"input file {path} does not exist") from None
        except (ValueError, OSError) as e:
            raise SplitcError(f"{path} is not a readable .npy file: {e}") from None
        if tuple(x.shape) != t.shape:
            raise SplitcError(f"{path}: input {name!r} must have shape {list(t.shape)}, "
                              f"the file holds {list(x.shape)}")
        arrays.append(x.astype(t.dtype, copy=False))
    return arrays


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``run`` and ``keys`` to ``app``."""
    app.command()(serve)
    app.command()(run)
    app.command()(keys)
