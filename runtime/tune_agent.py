"""``splitc tune-agent``: serve a board to ``splitc tune`` through TVM's RPC.

Board-side code: loads the TVM *runtime* only (``TVM_USE_RUNTIME_LIB=1``), like the worker.
It registers with an RPC tracker under a key (the target's name, e.g. ``rpi4``); ``splitc
tune --target rpi4 --rpc TRACKER:PORT --key rpi4`` then cross-compiles candidate kernels on
the compiling machine, and this agent receives each library, loads it and times it on the
board's CPU.

    python -m splitc.runtime.tune_agent --tracker 10.0.0.1:9190 --key rpi4
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitc.runtime.tune_agent",
                                     description="Serve this board to `splitc tune` (TVM RPC).")
    parser.add_argument("--tracker", required=True, help="the RPC tracker, HOST:PORT")
    parser.add_argument("--key", required=True, help="the key `splitc tune --key` asks for "
                                                     "(the target name, e.g. rpi4)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090, help="first port to try")
    parser.add_argument("--port-end", type=int, default=9199, help="last port to try")
    parser.add_argument("--custom-addr", help="address to report to the tracker (when the "
                                              "tracker cannot reach --host)")
    args = parser.parse_args(argv)
    host, sep, port = args.tracker.rpartition(":")
    if not sep or not port.isdigit():
        print(f"error: --tracker {args.tracker!r}: give HOST:PORT", file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # no compiler on a board
    sys.modules.setdefault("torch", None)  # tvm_ffi would import it where installed
    from tvm import rpc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s splitc-tune-agent %(message)s")
    server = rpc.Server(args.host, args.port, args.port_end, key=args.key,
                        tracker_addr=(host, int(port)), custom_addr=args.custom_addr)
    logging.info("serving key %s to tracker %s on port %d", args.key, args.tracker, server.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.proc.join()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.terminate()  # (and the processes it started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
