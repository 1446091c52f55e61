"""The board runtime: the plan format, device artifacts, and running a plan — in one process
(:class:`~splitc.runtime.local.LocalSession`) or across boards over ZeroMQ
(:func:`connect` on the client, :mod:`splitc.runtime.worker` on every board).

Importing this package loads nothing heavy; ``connect`` is imported on first use so that a
board running ``python -m splitc.runtime.worker`` never loads the client.
"""

__all__ = ["connect"]


def __getattr__(name: str):
    if name == "connect":
        from .client import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
