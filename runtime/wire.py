"""The splitc wire format: what a client and the workers (``splitc serve``) send each other.

Board-side code: imports numpy and pyzmq only. Nothing is ever pickled.

Messages
--------
Every message is one ZeroMQ multipart message::

    [routing id]        only on a ROUTER socket (added and removed by ZeroMQ's routing)
    header              UTF-8 JSON object, at most MAX_HEADER bytes
    frame 0 .. n-1      raw tensor bytes (C order, native little-endian), one per entry of
                        header["tensors"]; no other kind carries frames

Header fields (every message)::

    v        1 (VERSION); anything else is refused
    kind     one of KINDS (below)
    src      who sends: "client" or a device name from the plan
    session  the session id the client opened with ``setup`` ("" before one, and in every
             reply a worker sends to anyone but the session's client: the id is a secret)
    digest   the plan digest (``Plan.digest()``) the sender holds ("" on ``ping``)

Kinds::

    ping     anyone -> worker      liveness; answered with pong. A worker pinging its peers
                                     during a setup adds the session id; the pong then says
                                     + member: whether that id is the peer's session
    pong     worker -> anyone      + device, digest, pid, pieces, lib_sha256, weights_sha256
                                     of its main plan (the client refuses a worker holding
                                     another compile), plans (the digests of every plan it
                                     can serve: the main plan, then fallback plans);
                                     never the session id
    setup    client -> worker      + peers {device: endpoint}, timeout (s), clock (the
                                     client's monotonic clock, s), request_timeout (s),
                                     previous (the id it replaces, or ""): opens a session
                                     on the plan whose digest it carries; the worker refuses
                                     (error) if it holds no such plan, then connects to the
                                     peers it sends to under that plan and pings them
    ready    worker -> client      + device: the session is set up, peers answered
    tensors  client/peer -> worker + rid, tensors [{name, dtype, shape}]: model inputs (from
             worker -> client        the client), transfers (from a peer device), or model
                                     outputs (to the client); one raw frame per entry;
                                     + deadline (s, optional): when the client gives up on
                                     the request, on the client's clock (workers convert it
                                     with the clock of the setup, so boards' clocks need not
                                     agree, and forward it unchanged); a worker skips the
                                     pieces of a request whose deadline has passed
    error    worker -> client      + rid (or null), device, piece (or ""), message, code
                                     ("session": the message named a session this worker
                                     does not hold, "replaced": another setup replaced the
                                     session, "refused": the sender may not send it, "" else)
    drop     client -> worker      + rid: forget a failed or abandoned request
    stats    client -> worker      ask for counters; the worker answers with kind stats and
             worker -> client        + device, counters {recv, sent, pieces_run, memory, ...}

Who may send what (checked by the worker, see :mod:`splitc.runtime.worker`): anyone may ping.
With keys (CurveZMQ) the sender is the name its public key is registered under (ZAP's user
id), whatever ``src`` says: only the client's key may ``setup``, ``drop`` or ask for
``stats``, and a device's key may send a worker only the tensors the plan routes from that
device to it. Without keys (loopback only) the session id is the secret: ``setup`` is refused
while another client's session is alive unless it names that session as ``previous``,
``drop`` and ``stats`` come only from the connection that set the session up, and
``tensors`` must carry the session id (as ``src`` "client" only from that connection).

At most MAX_INFLIGHT requests are in flight per session: a client submits no more, and a
worker holds the partial inputs of at most MAX_PENDING requests (each until its deadline).

Checks on receipt (:func:`recv`): header size, valid JSON object, version, known kind, integer
``rid`` where one is needed, and for ``tensors``: each entry's dtype in DTYPES, shape a list of
non-negative integers, and — when the receiver gives the plan's tensor specs — a name the plan
knows with exactly the plan's shape and dtype; the frame count must equal the entries and each
frame's byte length must equal ``prod(shape) * itemsize``. A failed check raises
:class:`WireError` after the rest of the message has been drained; workers answer it with an
``error`` message and keep serving.

Copies
------
Frames of at least COPY_THRESHOLD bytes are sent with ``copy=False`` (ZeroMQ reads the numpy
buffer in place; the array must not be changed until it is sent). With the plan's specs,
frames are received with ``recv_into`` straight into a buffer allocated (or taken from a
:class:`BufferPool`) before the read; without specs, the frame is received zero-copy and
wrapped with ``np.frombuffer``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import zmq

VERSION = 1
#: The sender name of the client in ``src``.
CLIENT = "client"
#: Frames at least this large are sent without copying them into ZeroMQ.
COPY_THRESHOLD = 64 * 1024
#: A header longer than this is refused without being parsed.
MAX_HEADER = 64 * 1024
#: At most this many dimensions in a tensor's shape.
MAX_RANK = 16
#: A client keeps at most this many requests in flight per session (the in-flight depth that
#: a worker's memory bound is computed for, see :mod:`splitc.runtime.guard`).
MAX_INFLIGHT = 16
#: A request without a deadline is given this many seconds.
DEFAULT_DEADLINE_S = 60.0
#: libzmq heartbeats on every runtime connection (a ZMTP PING every HEARTBEAT_IVL_MS, answered
#: by the peer's I/O thread, so a worker busy computing still answers): a peer from which no
#: complete message arrives for HEARTBEAT_TIMEOUT_MS after a PING is disconnected, which the
#: client sees as a lost worker. A frozen, dead or unplugged worker is so detected within
#: IVL + TIMEOUT = 1.6 s. The same bound limits the slowest link: one frame must cross it in
#: under HEARTBEAT_TIMEOUT_MS (150 MB at 1 Gbit/s, 15 MB at 100 Mbit/s).
HEARTBEAT_IVL_MS = 400
HEARTBEAT_TIMEOUT_MS = 1200
#: zmq.POLLIN and zmq.SNDMORE as plain ints (the enums' ``&`` and ``|`` are slow on the hot
#: path: ``0 | zmq.SNDMORE`` builds a new enum member)
POLLIN, SNDMORE = int(zmq.POLLIN), int(zmq.SNDMORE)

PING, PONG, SETUP, READY = "ping", "pong", "setup", "ready"
TENSORS, ERROR, DROP, STATS = "tensors", "error", "drop", "stats"
KINDS = frozenset({PING, PONG, SETUP, READY, TENSORS, ERROR, DROP, STATS})
#: Kinds that carry a request id.
WITH_RID = frozenset({TENSORS, DROP})
#: Header fields that, where present, must be finite numbers (seconds).
NUMBERS = ("deadline", "clock", "timeout", "request_timeout")
#: The dtypes allowed on the wire (numpy names, as in the plan).
DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                    "uint8", "uint16", "uint32", "bool"})
_NAME = {np.dtype(n): n for n in DTYPES}       # str(dtype) is slow on the hot path
_ITEMSIZE = {n: np.dtype(n).itemsize for n in DTYPES}


class WireError(ValueError):
    """A message that breaks the wire format. ``head`` holds what could be parsed of its
    header (for an error reply that names the request)."""

    def __init__(self, message: str, head: dict | None = None):
        super().__init__(message)
        self.head = head or {}
        self.route: bytes | None = None  # set by recv on a ROUTER: who sent it
        self.origin = Origin()

    @property
    def rid(self) -> int | None:
        rid = self.head.get("rid")
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


class TensorSpec(Protocol):
    """What a tensor must look like: anything with ``shape`` and ``dtype`` (a plan Tensor)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class Origin:
    """Where a message came from, as ZeroMQ tells it on a ROUTER: the connection's file
    descriptor (``ZMQ_SRCFD``; None where the transport has none), the user id the ZAP
    handler gave its key (None without keys), and the size of every frame read (for the
    connection's byte account, :mod:`splitc.runtime.guard`)."""

    fd: int | None = None
    user: str | None = None
    sizes: list[int] = field(default_factory=list)


@dataclass
class Message:
    """One received message: its header, its arrays (in header order), and on a ROUTER the
    routing id of the connection it came from and what ZeroMQ says of that connection."""

    head: dict
    arrays: list[np.ndarray] = field(default_factory=list)
    route: bytes | None = None
    origin: Origin = field(default_factory=Origin)

    @property
    def kind(self) -> str:
        return self.head["kind"]

    @property
    def rid(self) -> int | None:
        return self.head.get("rid")

    @property
    def src(self) -> str:
        return self.head.get("src", "")

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.head.get("tensors", ())]

    def named(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.arrays, strict=True))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


#: Byte alignment of received tensors: what TVM needs to take an array without copying it
#: (``tvm.runtime.from_dlpack``; numpy's own allocations are aligned to 16).
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on an :data:`ALIGNMENT`-byte boundary."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dt).reshape(shape)


class BufferPool:
    """Receive buffers reused across requests, per (shape, dtype); at most ``depth`` kept per
    key. Only give back arrays nothing else refers to any more."""

    def __init__(self, depth: int = 8):
        self.depth = depth
        self._free: dict[tuple, list[np.ndarray]] = defaultdict(list)

    def take(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else aligned_empty(shape, dtype)

    def give(self, array: np.ndarray) -> None:
        free = self._free[(array.shape, _NAME.get(array.dtype) or str(array.dtype))]
        if len(free) < self.depth:
            free.append(array)


def tune(sock: zmq.Socket) -> zmq.Socket:
    """Options every runtime socket gets: no lingering on close, libzmq heartbeats (so a dead
    peer's connection is dropped and seen as a disconnect)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    return sock


def header(kind: str, *, src: str, session: str = "", digest: str = "", **fields) -> dict:
    """A header dict for ``kind`` (``tensors`` entries are added by :func:`send`)."""
    return {"v": VERSION, "kind": kind, "src": src, "session": session, "digest": digest,
            **fields}


def _entries(arrays: Sequence[np.ndarray], names: Sequence[str]) -> list[dict]:
    return [{"name": n, "dtype": _NAME.get(a.dtype) or str(a.dtype), "shape": list(a.shape)}
            for n, a in zip(names, arrays, strict=True)]


#: How a tensors header written once (:class:`TensorsHead`) ends: these fields, then ``}``;
#: :class:`Headers` reads them back off the end.
_RID, _DEADLINE = b',"rid":', b',"deadline":'


class TensorsHead:
    """The header of the ``tensors`` messages that carry the same tensors to the same peer
    under one session (a piece's outputs to one device: their names, dtypes and shapes are
    the plan's), encoded once; :meth:`raw` adds each message's request id and deadline.
    (``json.dumps`` of the whole header, message after message, was the largest single part
    of a worker's CPU per message it sent.)"""

    def __init__(self, head: dict, arrays: Sequence[np.ndarray], names: Sequence[str]):
        if "rid" in head or "deadline" in head or head.get("kind") != TENSORS:
            raise ValueError("a tensors header without its request id and deadline")
        fixed = {**head, "tensors": _entries(arrays, names)}
        # (the object's closing brace left off: the request's fields follow)
        self._prefix = json.dumps(fixed, separators=(",", ":"))[:-1].encode()

    def raw(self, rid: int, deadline: float | None = None) -> bytes:
        """The header for request ``rid`` (a deadline in seconds, finite, or none), as
        ``json.dumps`` would write it (a float's JSON is its repr)."""
        if deadline is None:
            return b"%s%s%d}" % (self._prefix, _RID, rid)
        return b"%s%s%d%s%s}" % (self._prefix, _RID, rid, _DEADLINE, repr(deadline).encode())


#: The request's own fields at the end of a header as :meth:`TensorsHead.raw` writes them: an
#: id (a JSON integer) and maybe a deadline (a JSON number; of a float's length at most, a
#: longer one is read in full, as ``json.loads`` reads it)
_REQUEST_FIELDS = re.compile(re.escape(_RID) + rb'(0|[1-9][0-9]{0,17})(?:' + re.escape(_DEADLINE)
                             + rb'(-?(?:0|[1-9][0-9]{0,29})(?:\.[0-9]{1,30})?'
                             rb'(?:[eE][-+]?[0-9]{1,4})?))?}\Z')


class Headers:
    """What :func:`recv` learnt from the ``tensors`` headers it read: the checked header and
    entries, by the bytes before the request's own fields (a sender's
    :class:`TensorsHead` prefix, the same for every request of a session). A header that
    begins with bytes seen before is read as the header it was plus this message's request
    id and deadline, without parsing and checking it again: what it says is exactly what
    ``json.loads`` would make of it (anything else is read in full). (Parsing and checking,
    message after message, were a quarter of a worker's CPU to receive one.)"""

    #: kept are prefixes of at most PREFIX bytes, BYTES of them in all (a session's are a few
    #: hundred bytes each, one per sender and piece): whatever strangers send, the worker's
    #: memory bound (:mod:`.guard`) has room for them
    PREFIX, BYTES = 4096, 256 << 10

    def __init__(self):
        self._known: dict[bytes, tuple[dict, tuple]] = {}
        self._bytes = 0
        self._specs: Mapping[str, TensorSpec] | None = None

    def read(self, raw: bytes, specs: Mapping[str, TensorSpec] | None
             ) -> tuple[dict, Sequence[tuple[str, tuple[int, ...], str]]]:
        """The checked header ``raw`` and its tensor entries (raises :class:`WireError`)."""
        if specs is not self._specs:  # (entries are checked against these specs)
            self._known.clear()
            self._bytes, self._specs = 0, specs
        cut = raw.rfind(_RID)
        tail = _REQUEST_FIELDS.match(raw, cut) if cut > 0 and len(raw) <= MAX_HEADER else None
        known = self._known.get(raw[:cut]) if tail else None
        if known is not None:
            deadline = tail.group(2)
            head = {**known[0], "rid": int(tail.group(1))}
            if deadline is None:
                return head, known[1]
            value = float(deadline) if deadline.strip(b"-0123456789") else int(deadline)
            if math.isfinite(value):
                head["deadline"] = value
                return head, known[1]
        head = parse_header(raw)
        entries = tensor_entries(head, specs)
        if tail and head["kind"] == TENSORS and cut <= self.PREFIX:
            fixed = {k: v for k, v in head.items() if k not in ("rid", "deadline")}
            try:  # (kept only if the bytes before say all of it: no field twice)
                whole = json.loads(raw[:cut] + b"}") == fixed
            except ValueError:
                whole = False
            if whole:
                if self._bytes + cut > self.BYTES:
                    self._known.clear()
                    self._bytes = 0
                self._known[raw[:cut]] = (fixed, tuple(entries))
                self._bytes += cut
        return head, entries


def send(sock: zmq.Socket, head: dict | bytes, arrays: Sequence[np.ndarray] = (),
         names: Sequence[str] = (), *, route: bytes | None = None, flags: int = 0) -> int:
    """Send ``head`` and, for a ``tensors`` message, the named arrays; returns tensor bytes.

    ``head`` is a header dict, or one already encoded (:meth:`TensorsHead.raw`, whose
    entries must be ``arrays``'). ``route`` is the routing id to send to on a ROUTER socket.
    Frames of COPY_THRESHOLD bytes or more are sent zero-copy: do not change those arrays
    afterwards.
    """
    # (not np.ascontiguousarray: it turns a 0-d array into 1-d)
    arrays = [a if a.flags.c_contiguous else np.copy(a, order="C")
              for a in map(np.asarray, arrays)]
    if isinstance(head, bytes):
        raw = head
    else:
        if arrays or head.get("kind") == TENSORS:
            head = {**head, "tensors": _entries(arrays, names)}
        raw = json.dumps(head, separators=(",", ":")).encode()
    flags = int(flags)  # (zmq.NOBLOCK | SNDMORE would build enum members, frame after frame)
    if route is not None:
        sock.send(route, flags | SNDMORE)
    sock.send(raw, flags | (SNDMORE if arrays else 0))
    for i, a in enumerate(arrays):
        more = SNDMORE if i + 1 < len(arrays) else 0
        # a flat byte view: works for 0-d and bool arrays alike
        sock.send(a.reshape(-1).view(np.uint8), flags | more, copy=a.nbytes < COPY_THRESHOLD)
    return sum(a.nbytes for a in arrays)


def parse_header(raw: bytes) -> dict:
    """Decode and check the fields every header must have (see the module docstring)."""
    if len(raw) > MAX_HEADER:
        raise WireError(f"header of {len(raw)} bytes is longer than {MAX_HEADER}")
    try:
        head = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(head, dict):
        raise WireError("header is not a JSON object")
    if head.get("v") != VERSION:
        raise WireError(f"wire format version {head.get('v')!r}, this side speaks {VERSION}",
                        head)
    kind = head.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:  # (a dict is not even hashable)
        raise WireError(f"unknown message kind {str(kind)[:100]!r}", head)
    for key in ("src", "session", "digest"):
        if not isinstance(head.get(key, ""), str):
            raise WireError(f"header field {key!r} must be a string", head)
    if head["kind"] in WITH_RID:
        rid = head.get("rid")
        if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
            raise WireError(f"{head['kind']} message needs a request id (rid >= 0), "
                            f"got {rid!r}", head)
    for key in NUMBERS:
        value = head.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise WireError(f"{key} must be a number of seconds, got {str(value)[:100]!r}",
                            head)
    return head


def tensor_entries(head: dict, specs: Mapping[str, TensorSpec] | None
                   ) -> list[tuple[str, tuple[int, ...], str]]:
    """Check a ``tensors`` header's entries: (name, shape, dtype) for each frame to come."""
    entries = head.get("tensors", [])
    if head["kind"] != TENSORS:
        if entries:
            raise WireError(f"a {head['kind']} message carries no tensors", head)
        return []
    if not isinstance(entries, list) or not entries:
        raise WireError("tensors message without a list of tensors", head)
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise WireError(f"malformed tensor entry {e!r}", head)
        name, dtype, shape = e["name"], e.get("dtype"), e.get("shape")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WireError(f"tensor {name!r}: dtype {dtype!r} is not allowed on the wire "
                            f"(allowed: {', '.join(sorted(DTYPES))})", head)
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)):
            raise WireError(f"tensor {name!r}: malformed shape {shape!r}", head)
        if specs is not None:
            want = specs.get(name)
            if want is None:
                raise WireError(f"tensor {name!r} is not one this side receives", head)
            if tuple(shape) != tuple(want.shape) or dtype != want.dtype:
                raise WireError(f"tensor {name!r}: got {dtype}{shape}, the plan says "
                                f"{want.dtype}{list(want.shape)}", head)
        out.append((name, tuple(shape), dtype))
    return out


def _drain(sock: zmq.Socket, sizes: list[int]) -> None:
    while sock.getsockopt(zmq.RCVMORE):
        sizes.append(len(sock.recv(copy=False)))


def _origin(frame: zmq.Frame, keys: bool) -> Origin:
    try:
        fd = frame.get(zmq.SRCFD)
    except zmq.ZMQError:  # (a transport without a file descriptor)
        fd = None
    user = None
    if keys:  # (without a ZAP handler the lookup raises: 3 us a message for nothing)
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            pass
    return Origin(fd if isinstance(fd, int) and fd >= 0 else None, user or None)


def recv(sock: zmq.Socket, *, route: bool = False, keys: bool = True,
         specs: Mapping[str, TensorSpec] | None = None,
         alloc: Callable[[tuple[int, ...], str], np.ndarray] | None = None,
         flags: int = 0, headers: Headers | None = None) -> Message:
    """Receive and check one message (raises :class:`WireError`, the message drained).

    ``route``: the socket is a ROUTER (the first frame is the sender's routing id; the
    message's ``origin`` says which connection and key it came from: the key's user id only
    with ``keys``, for a socket whose peers authenticate).
    ``specs``: the tensors this side accepts, by name (shape and dtype must match); their
    frames are read with ``recv_into`` into ``alloc(shape, dtype)`` (default :func:`aligned_empty`).
    Without specs, frames are wrapped zero-copy (read-only arrays).
    ``headers``: the receiver's :class:`Headers`, to read a header seen before at once.
    """
    origin = Origin()
    route_id = None
    if route:
        frame = sock.recv(flags, copy=False)
        route_id, origin = frame.bytes, _origin(frame, keys)
    try:
        # the header is the first frame on a DEALER: it gets the caller's flags (NOBLOCK)
        msg = _recv_rest(sock, route_id, specs, alloc or aligned_empty, 0 if route else flags,
                         origin.sizes, headers)
    except WireError as e:
        e.route, e.origin = route_id, origin
        raise
    msg.origin = origin
    return msg


def _recv_rest(sock, route_id, specs, alloc, flags, sizes, headers) -> Message:
    if route_id is not None and not sock.getsockopt(zmq.RCVMORE):
        raise WireError("message has a routing id and nothing else")
    raw = sock.recv(flags)
    sizes.append(len(raw))
    try:
        if headers is not None:
            head, entries = headers.read(raw, specs)
        else:
            head = parse_header(raw)
            entries = tensor_entries(head, specs)
    except WireError:
        _drain(sock, sizes)
        raise
    arrays = []
    for i, (name, shape, dtype) in enumerate(entries):
        if not sock.getsockopt(zmq.RCVMORE):
            raise WireError(f"truncated message: {i} frames, the header announces "
                            f"{len(entries)}", head)
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if specs is not None:
            buf = alloc(shape, dtype)
            got = sock.recv_into(buf.reshape(-1).view(np.uint8)) if nbytes else \
                len(sock.recv())
            arr = buf
        else:
            frame = sock.recv(copy=False)
            got = len(frame.buffer)
            arr = np.frombuffer(frame.buffer, dtype=dtype).reshape(shape) if got == nbytes \
                else None
        sizes.append(got)
        if got != nbytes:
            _drain(sock, sizes)
            raise WireError(f"tensor {name!r}: frame of {got} bytes, {dtype}{list(shape)} "
                            f"needs {nbytes}", head)
        arrays.append(arr)
    if sock.getsockopt(zmq.RCVMORE):
        _drain(sock, sizes)
        raise WireError(f"message has more frames than the {len(entries)} its header "
                        "announces", head)
    return Message(head, arrays, route_id)
