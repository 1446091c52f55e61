"""What more than one benchmark measures the same way."""

from __future__ import annotations

import statistics
import time


def ort_latency(model, x, repeats: int) -> float:
    """Median seconds of ONNX Runtime on ``model.path`` with one thread, after one warm-up."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip(model.input_names, x, strict=True))
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)
