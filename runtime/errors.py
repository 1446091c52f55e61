"""The board runtime's errors, apart from the compile side's (the runtime imports nothing of
the compiler; the compile side and the CLI may wrap these).

Two kinds, because a caller acts differently on each:

* :class:`BadInput` — what was given cannot work (a missing or inconsistent plan or artifact
  folder, a bad key folder, an endpoint or input of the wrong form). Fixing the input is the
  only cure; the CLI exits with status 2.
* :class:`RuntimeFailure` — a request or session failed on the cluster (a worker lost, a
  timeout, an error a worker reported, a refused handshake). The CLI exits with status 1.
"""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Every error the board runtime raises on purpose."""


class BadInput(RuntimeErrorBase, ValueError):
    """Something the user gave the runtime cannot work; the message names it."""


class RuntimeFailure(RuntimeErrorBase):
    """A request or session failed on the cluster. ``device``/``endpoint`` name where."""

    def __init__(self, message: str, *, device: str = "", endpoint: str = "",
                 piece: str = "", rid: int | None = None):
        super().__init__(message)
        self.device, self.endpoint, self.piece, self.rid = device, endpoint, piece, rid
