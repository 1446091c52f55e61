"""The README's example pictures, made the way a user makes them: ResNet-50 (224x224) on four
devices, through the ``splitc`` CLI (subprocesses), saved under ``benchmarks/results/``.

* ``splitc compile ... --strategy spatial`` (what ``auto`` chooses for ResNet-50 on four
  emulated boards, ``cluster.py``; on this machine's cores auto keeps the model on one) and
  ``splitc inspect OUT --trace``: the cost model's predicted timeline of that plan;
* ``splitc run OUT --requests R --trace``: the measured timeline of R requests on one local
  worker process per device (Chrome Trace Event JSON; open either in ui.perfetto.dev);
* ``splitc inspect OUT --draw``: the plan as a Graphviz picture (SVG and PNG);
* both timelines of the first request drawn one above the other with matplotlib (PNG and SVG),
  on the same time axis: where the prediction is wrong shows at a glance.

The local workers share this machine's cores (four devices on two cores here), so the measured
pieces take longer than on four boards; the picture's title says so. File names carry the LLVM
cpu (one set per CPU).

    .venv/bin/python benchmarks/example_trace.py            # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import cpu_name, machine, save_figure  # noqa: E402

from splitc import targets  # noqa: E402

HERE = Path(__file__).resolve().parent
SPLITC = [sys.executable, "-m", "splitc.cli"]


def splitc(*args) -> str:
    """Run the CLI as a user does; its stdout (stderr shown on failure)."""
    r = subprocess.run([*SPLITC, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "120"})
    if r.returncode != 0:
        raise SystemExit(f"splitc {' '.join(map(str, args))} failed ({r.returncode}):\n"
                         f"{r.stderr}")
    return r.stdout


def spans(path: Path, request: int | None) -> tuple[dict[str, list], str]:
    """The trace's complete events by track name (only ``request``'s, when given, and the
    spans of no request), and its title."""
    doc = json.loads(path.read_text())
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    out: dict[str, list] = {}
    for e in doc["traceEvents"]:
        if e["ph"] != "X" or e["dur"] <= 0:
            continue
        if request is not None and e["args"].get("request", request) != request:
            continue
        out.setdefault(names[e["pid"]], []).append(
            (lanes[(e["pid"], e["tid"])], e["name"], e["ts"] / 1e3, e["dur"] / 1e3))
    return out, doc["otherData"].get("title", "")


def draw(predicted: Path, measured: Path, out: Path, title: str) -> None:
    """Predicted and measured timelines of one request, one above the other, in ms from the
    first event of each."""
    colours = {"compute": "tab:blue", "send": "tab:orange", "wait": "tab:gray",
               "recv": "tab:green", "request": "tab:purple"}
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, (path, request, what) in zip(axes, ((predicted, None, "predicted (cost model)"),
                                                (measured, 0, "measured (first request)")),
                                         strict=True):
        tracks, _ = spans(path, request)
        t0 = min(s[2] for v in tracks.values() for s in v)
        width = max(s[2] + s[3] for v in tracks.values() for s in v) - t0
        order = sorted(tracks, key=lambda t: (t == "client", t))
        for row, track in enumerate(order):
            for lane, name, start, dur in tracks[track]:
                kind = lane.split()[0]
                height = 0.6 if kind == "compute" else 0.25
                offset = {"compute": 0.0, "send": 0.3, "wait": -0.3}.get(kind, 0.0)
                ax.barh(row + offset, dur, left=start - t0, height=height,
                        color=colours.get(kind, "tab:purple"), edgecolor="black",
                        linewidth=0.3)
                if kind == "compute" and dur > 0.12 * width:
                    ax.text(start - t0 + dur / 2, row, name, ha="center", va="center",
                            fontsize=7, clip_on=True)
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        ax.set_title(what, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("time from the request's first event (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=len(colours), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    save_figure(fig, out)
    plt.close(fig)


def stamp(path: Path) -> None:
    """Name the machine in a file the CLI wrote (a PNG text chunk, an SVG comment, a trace's
    otherData)."""
    where = f"made on {machine()}"
    if path.suffix == ".png":
        from PIL import Image, PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("Description", where)
        Image.open(path).save(path, pnginfo=info)
    elif path.suffix == ".json":  # a Chrome trace: beside its title
        doc = json.loads(path.read_text())
        doc.setdefault("otherData", {})["machine"] = where
        path.write_text(json.dumps(doc))
    elif path.suffix == ".svg":
        text = path.read_text()
        head, _, rest = text.partition("?>")
        path.write_text(f"{head}?>\n<!-- {where} -->{rest}" if rest else f"<!-- {where} -->\n"
                        + text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("-n", "--devices", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--strategy", default="spatial")
    ap.add_argument("--save", type=Path, default=HERE / "results")
    args = ap.parse_args()

    cpu, llvm = cpu_name(), targets.host_cpu()
    stem = f"example-{args.model}-224-n{args.devices}-{llvm}"
    devices = ",".join(["host"] * args.devices)
    args.save.mkdir(parents=True, exist_ok=True)
    predicted = args.save / f"{stem}-predicted.json"
    measured = args.save / f"{stem}-measured.json"
    with tempfile.TemporaryDirectory(prefix="splitc-example-") as work:
        out = Path(work) / "out"
        splitc("compile", args.model, "-o", out, "--devices", devices, "--strategy",
               args.strategy)
        explained = splitc("inspect", out, "--trace", predicted)
        ran = splitc("run", out, "--requests", args.requests, "--trace", measured, "--check")
        for suffix in ("svg", "png"):
            picture = args.save / f"{stem}-plan.{suffix}"
            splitc("inspect", out, "--draw", picture)
            stamp(picture)
        shown = splitc("inspect", out)
    for trace in (predicted, measured):
        stamp(trace)
    title = (f"{args.model} 224x224, {args.strategy} split over {args.devices} devices; "
             f"measured on local workers sharing {os.cpu_count()} cores of {cpu} ({llvm})")
    draw(predicted, measured, args.save / f"{stem}-timeline", title)
    print(f"# {title}")
    print(shown.strip())
    print(explained.strip().splitlines()[-1])
    print(ran.strip())
    print(f"wrote {args.save}/{stem}-*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
