"""The board runtime: the plan format, device artifacts, and running a plan — in one process
(:class:`~splitc.runtime.local.LocalSession`) or across boards over ZeroMQ
(:func:`splitc.runtime.client.connect` on the client, :mod:`splitc.runtime.worker` on every
board).

Imports only the standard library, numpy, pyzmq and (where pieces run) the TVM runtime; this
package itself imports nothing, so a board running the worker never loads the client.
"""
