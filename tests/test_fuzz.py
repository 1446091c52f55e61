"""10,000 hostile messages to a live worker: each gets an error reply, none crashes it or
stays held, and a good request afterwards still gets the right answer.

A seeded fuzzer (no extra dependency) mutates real messages of the worker's own protocol:
random bytes, flipped header bytes, JSON fields replaced with values of every type, wrong
dtypes and shapes (negative, huge, wrong rank), frames cut short, padded or added, and
oversized headers. After every message the fuzzer sends a ``ping``; the worker answers in
order, so its ``pong`` marks that the message was dealt with, without waiting on timeouts.
"""

from __future__ import annotations

import json
import random

import numpy as np
import zmq

from splitc.runtime import wire
from splitc.runtime.client import connect
from splitc.runtime.plan import Plan

from .runtime_fixtures import random_inputs, write_out

MESSAGES = 10_000
VALUES = [None, True, -1, 0, 1, 2**31, 2**63, 1e308, float("nan"), "", "x" * 300, "float32",
          "../../etc/passwd", [], [1, 2], [-1], [2**40, 2**40], {}, {"a": {"b": [None]}}]
DTYPES = ["float32", "float64", "int8", "bool", "object", "V8", "<f4", "float1", "", "str"]


def mutate(rng: random.Random, head: dict, frame: bytes) -> list[bytes]:
    """One hostile message derived from a valid ``(head, frame)``."""
    kind = rng.randrange(8)
    if kind == 0:  # noise
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:  # flipped bytes in the header
        raw = bytearray(json.dumps(head).encode())
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return [bytes(raw), frame]
    h = json.loads(json.dumps(head))
    if kind == 2:  # a field replaced by a value of another type
        h[rng.choice([*h, "extra"])] = rng.choice(VALUES)
    elif kind == 3:  # tensor entry fields replaced
        t = h["tensors"][0]
        t[rng.choice(["name", "dtype", "shape", "other"])] = rng.choice(VALUES)
    elif kind == 4:  # dtype and shape
        t = h["tensors"][0]
        t["dtype"] = rng.choice(DTYPES)
        t["shape"] = [rng.choice([-3, 0, 1, 7, 2**20, 2**62]) for _ in range(rng.randrange(0, 18))]
    elif kind == 5:  # frames cut, padded, dropped or added
        cut = rng.randrange(8)
        frames = [frame[:-cut or None], frame + b"\0" * cut, b"", frame * 2]
        return [json.dumps(h).encode(), *rng.sample(frames, rng.randrange(0, 3))]
    elif kind == 6:  # many tensors announced
        h["tensors"] = h["tensors"] * rng.choice([0, 2, 1000])
    else:  # oversized header
        h["pad"] = "x" * (wire.MAX_HEADER + rng.randrange(1, 1000))
    return [json.dumps(h).encode(), frame]


def test_ten_thousand_fuzzed_messages(tmp_path):
    out = tmp_path / "out"
    plan = write_out(out, "pipeline", 2)
    plan = Plan.load(out)
    x = random_inputs(plan)
    rng = random.Random(1234)
    with connect(out) as session:
        want = session.infer(*x)
        dev1_input = next(t.tensor for t in plan.transfers if t.dst == "dev1")
        spec = plan.tensors[dev1_input]
        # A stranger's session id: errors go back to the fuzzer only. (Every frame is still
        # parsed and checked against the plan before the session is looked at.)
        head = {"v": 1, "kind": "tensors", "src": "dev0", "session": "not-" + session.id,
                "digest": session.digest, "rid": 10**6,
                "tensors": [{"name": dev1_input, "dtype": spec.dtype, "shape": list(spec.shape)}]}
        frame = np.zeros(spec.shape, spec.dtype).tobytes()
        ctx = zmq.Context()
        try:
            sock = wire.tune(ctx.socket(zmq.DEALER))
            sock.connect(session.endpoints["dev1"])
            sock.setsockopt(zmq.RCVTIMEO, 10_000)
            for i in range(MESSAGES):
                head["rid"] = 10**6 + i
                parts = mutate(rng, head, frame)
                sock.send_multipart(parts)
                wire.send(sock, wire.header(wire.PING, src="fuzz"))
                answers = []
                while True:
                    try:
                        reply = wire.recv(sock)
                    except zmq.Again:
                        raise AssertionError(f"dev1 went silent after message {i}: "
                                             f"{[p[:300] for p in parts]}") from None
                    if reply.kind == wire.PONG:
                        break
                    answers.append(reply.kind)
                # exactly one error each: nothing from a stranger's session is held, and
                # nothing is dropped unanswered (a check the wire misses would be)
                assert answers == [wire.ERROR], (i, answers, [p[:200] for p in parts])
        finally:
            ctx.destroy(linger=0)
        assert session.worker_stats()["dev1"]["pending"] == 0
        # alive, and still right
        for y, w in zip(session.infer(*x), want, strict=True):
            assert np.array_equal(y, w)
