"""What more than one benchmark measures the same way."""

from __future__ import annotations

import os
import statistics
import struct
import time
from pathlib import Path

_AWAKE: list[int] = []  # the open PM QoS request (released when the process exits)


def ort_runner(model, x):
    """A call of ONNX Runtime on ``model.path`` with one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip(model.input_names, x, strict=True))
    return lambda: sess.run(None, feed)


def ort_latency(model, x, repeats: int) -> float:
    """Median seconds of ONNX Runtime on ``model.path`` with one thread, after one warm-up."""
    return interleaved({"ort": ort_runner(model, x)}, repeats)["ort"]


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable in ``runs`` after one warm-up call each, timed in
    rounds of one call of each (the order rotating every round), so that a slow spell of a
    shared machine falls on all of them alike rather than on whichever ran then."""
    names = list(runs)
    for name in names:
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def keep_cores_awake() -> str:
    """Ask the kernel to keep every core out of its halt state while this process lives (a
    PM QoS request of 0 us on ``/dev/cpu_dma_latency``: the idle loop polls instead), and say
    so, or why not.

    A halted virtual CPU comes back slow: the same 125 us of Python took 236 us of CPU after
    20 ms of idling on an Intel Xeon VM (haltpoll), 129 us with the request held. A device
    emulated by time dilation sleeps through F-1 parts of every piece, where a board's core
    would be computing and awake, so without this its pieces and its message handling are
    measured cold: slower than the board would be, and slower than the profile."""
    if _AWAKE:
        return "cores kept awake (PM QoS: cpu_dma_latency 0 us)"
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
        os.write(fd, struct.pack("i", 0))
    except OSError as e:
        return (f"cores not kept awake ({e.strerror or e} on /dev/cpu_dma_latency): a core "
                "that halts between pieces measures them cold, slower than a busy board")
    _AWAKE.append(fd)
    return "cores kept awake (PM QoS: cpu_dma_latency 0 us)"


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (every saved result names it)."""
    from splitc import targets

    return targets.host_cpu_name()


def machine() -> str:
    """This machine as every saved result names it: the CPU's model and LLVM's name for it."""
    from splitc import targets

    return f"{cpu_name()} (LLVM cpu {targets.host_cpu()})"


def save_figure(fig, stem: Path) -> None:
    """``stem``.png and .svg, each naming the machine in its metadata (and the SVG's text kept
    as text, so the file can be searched)."""
    import matplotlib

    where = f"measured on {machine()}"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(stem.with_suffix(".png"), dpi=120, metadata={"Description": where})
        fig.savefig(stem.with_suffix(".svg"), metadata={"Description": where})
