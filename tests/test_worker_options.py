"""The worker's options are one value: `python -m splitc.runtime.worker`, `splitc serve` and the
`--restart` supervisor's child all start a worker from a WorkerOptions."""

import inspect
from dataclasses import fields

from splitc.cli_runtime import serve
from splitc.runtime.worker import WorkerOptions


def test_argv_gives_the_same_options_back():
    opts = WorkerOptions("OUT/dev0", "tcp://0.0.0.0:5555", announce="ep", keys="k",
                         insecure=True, max_message_bytes=4096, restart=True, fpga="board",
                         compute_priority="normal")
    assert WorkerOptions.parse(opts.argv()) == opts
    assert WorkerOptions.parse(["OUT/dev1"]) == WorkerOptions("OUT/dev1")


def test_splitc_serve_takes_every_worker_option():
    params = set(inspect.signature(serve).parameters) - {"device_folder"}
    assert params == {f.name for f in fields(WorkerOptions)} - {"folder"}
