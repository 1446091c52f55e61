"""Timelines of a plan's requests in Chrome's Trace Event format (what PyTorch's and TVM's
profilers write; opens in Perfetto, ui.perfetto.dev, or chrome://tracing).

One *process* per device (and one for the client), one *thread* per lane in it: ``compute``
(each piece), ``send -> DEV`` (each message to DEV, from when it starts leaving to when it has
arrived whole), ``recv`` (each message taken in) and ``wait`` (time a device idles for a
tensor). A message is also a *flow* arrow from its send to the piece that reads it. Times are
seconds here and microseconds in the file. Both ``splitc run --trace`` (measured) and
``splitc plan --trace`` (the cost model's prediction) write this, so the two lay side by
side.

Board-side code: standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIENT = "client"


@dataclass(frozen=True)
class Span:
    """Something ``track`` (a device, or the client) did on one lane from ``start`` to ``end``
    (seconds)."""

    track: str
    lane: str
    name: str
    start: float
    end: float
    request: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Flow:
    """A message: left ``src`` at ``start``, arrived whole at ``dst`` at ``end``."""

    name: str
    src: str
    dst: str
    start: float
    end: float
    nbytes: int
    request: int | None = None


@dataclass
class Timeline:
    """Spans and flows, collected while a request runs or is simulated."""

    spans: list[Span] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    #: what to record beside the events (a measured timeline: each worker's clock uncertainty)
    meta: dict[str, Any] = field(default_factory=dict)

    def span(self, track: str, lane: str, name: str, start: float, end: float,
             request: int | None = None, **args) -> None:
        self.spans.append(Span(track, lane, name, start, end, request, args))

    def message(self, name: str, src: str, dst: str, start: float, end: float, nbytes: int,
                request: int | None = None) -> None:
        """A message: a span on the sender's ``send -> dst`` lane, its arrival (an instant on
        the receiver's ``recv`` lane) and a flow between them."""
        self.flows.append(Flow(name, src, dst, start, end, nbytes, request))
        self.span(src, f"send -> {dst}", name, start, end, request, bytes=nbytes, to=dst)
        self.span(dst, "recv", name, end, end, request, bytes=nbytes, **{"from": src})

    def chrome(self, title: str = "") -> dict:
        """The timeline as a Chrome Trace Event document."""
        tracks = sorted({s.track for s in self.spans} | {f.src for f in self.flows}
                        | {f.dst for f in self.flows}, key=lambda t: (t == CLIENT, t))
        pid = {t: i + 1 for i, t in enumerate(tracks)}
        lanes: dict[tuple[str, str], int] = {}
        events: list[dict] = []

        def tid(track: str, lane: str) -> int:
            if (track, lane) not in lanes:
                lanes[(track, lane)] = len([k for k in lanes if k[0] == track]) + 1
                events.append({"ph": "M", "name": "thread_name", "pid": pid[track],
                               "tid": lanes[(track, lane)], "args": {"name": lane}})
            return lanes[(track, lane)]

        for t in tracks:
            events.append({"ph": "M", "name": "process_name", "pid": pid[t],
                           "args": {"name": t}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid[t],
                           "args": {"sort_index": pid[t]}})
        for s in sorted(self.spans, key=lambda s: (s.start, s.end)):
            args = {**s.args, **({"request": s.request} if s.request is not None else {})}
            events.append({"ph": "X", "name": s.name, "cat": s.lane.split()[0],
                           "ts": _us(s.start), "dur": _us(max(s.end - s.start, 0.0)),
                           "pid": pid[s.track], "tid": tid(s.track, s.lane), "args": args})
        for i, f in enumerate(self.flows):
            common = {"name": f.name, "cat": "message", "id": i + 1}
            events.append({**common, "ph": "s", "ts": _us(f.start), "pid": pid[f.src],
                           "tid": tid(f.src, f"send -> {f.dst}")})
            events.append({**common, "ph": "f", "bp": "e", "ts": _us(f.end), "pid": pid[f.dst],
                           "tid": tid(f.dst, "recv")})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"title": title, "format": "splitc-trace/1", **self.meta}}

    def write(self, path: str | Path, title: str = "") -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome(title)))
        return path


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)
