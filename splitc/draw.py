"""``splitc inspect OUT --draw plan.svg``: the plan as a picture, laid out by Graphviz.

One box per device (its target, pieces, FLOPs and weights) and one for the client; one arrow
per pair that exchanges anything, labelled with how many tensors and bytes cross it per
inference and the largest of them by what a user calls them (the plan's labels: the model's
layer, with the rows or channels). Graphviz (``dot``) places the boxes and the labels, so
nothing overlaps at any size; ``.svg``, ``.png`` and ``.pdf`` are written by suffix.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import graphviz

from splitc.errors import SplitcError
from splitc.report import human_bytes
from splitc.runtime.plan import Plan

CLIENT = "client"
#: Tensors named on an arrow (the largest); the rest are counted.
NAMED_PER_ARROW = 2
#: A label longer than this is cut (the middle of a long layer name goes).
MAX_LABEL = 44


def _short(text: str) -> str:
    if len(text) <= MAX_LABEL:
        return text
    keep = (MAX_LABEL - 1) // 2
    return text[:keep] + "…" + text[-keep:]


def flows(plan: Plan) -> dict[tuple[str, str], list[str]]:
    """The tensors each (sender, receiver) pair moves per inference, the client included."""
    moved: dict[tuple[str, str], list[str]] = defaultdict(list)
    readers = defaultdict(set)
    for p in plan.pieces:
        for t in p.inputs:
            readers[t].add(p.device)
    for t in plan.client_tensors:
        for d in sorted(readers[t]):
            moved[(CLIENT, d)].append(t)
    for t in plan.transfers:
        moved[(t.src, t.dst)].append(t.tensor)
    for e in plan.outputs:
        moved[(e.device, CLIENT)].append(e.tensor)
    return moved


def plan_graph(plan: Plan) -> graphviz.Digraph:
    """The picture as a Graphviz graph (see the module docstring)."""
    g = graphviz.Digraph("plan", graph_attr={
        "rankdir": "LR", "fontname": "Helvetica", "fontsize": "12", "labelloc": "t",
        "nodesep": "0.5", "ranksep": "1.4", "splines": "true", "forcelabels": "true",
        "label": f"{plan.strategy} split of {plan.source}: {len(plan.transfers)} transfers, "
                 f"{human_bytes(plan.transfer_bytes)} between devices per inference"},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                   "fontsize": "11", "fillcolor": "#e8f0fe", "color": "#3367d6"},
        edge_attr={"fontname": "Helvetica", "fontsize": "9", "color": "#d93025",
                   "fontcolor": "#a50e0e"})
    inputs = ", ".join(e.name for e in plan.inputs)
    outputs = ", ".join(e.name for e in plan.outputs)
    g.node(CLIENT, f"client\nsends {inputs}\nreceives {outputs}", fillcolor="#e6f4ea",
           color="#188038")
    for d in plan.devices:
        pieces = plan.pieces_on(d.name)
        g.node(d.name, f"{d.name} ({d.target})\n{len(pieces)} piece{'s' * (len(pieces) != 1)}, "
                       f"{sum(p.flops for p in pieces) / 1e6:,.0f} MFLOP\n"
                       f"{human_bytes(sum(p.weight_bytes for p in pieces))} of weights")
    for (src, dst), tensors in flows(plan).items():
        biggest = sorted(tensors, key=lambda t: -plan.tensors[t].nbytes)
        total = sum(plan.tensors[t].nbytes for t in tensors)
        lines = [f"{len(tensors)} tensor{'s' * (len(tensors) != 1)}, {human_bytes(total)}"]
        lines += [f"{_short(plan.labels.get(t, t))} ({human_bytes(plan.tensors[t].nbytes)})"
                  for t in biggest[:NAMED_PER_ARROW]]
        if len(tensors) > NAMED_PER_ARROW:
            lines.append(f"and {len(tensors) - NAMED_PER_ARROW} more")
        g.edge(src, dst, label="\n".join(lines),
               **({"color": "#188038", "fontcolor": "#0d652d"} if CLIENT in (src, dst)
                  else {}))
    return g


def draw(plan: Plan, path: str | Path) -> Path:
    """Write the plan's picture to ``path``: ``.svg``, ``.png`` or ``.pdf``."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png", "pdf"):
        raise SplitcError(f"--draw {path}: give a .svg, .png or .pdf file")
    try:
        data = plan_graph(plan).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise SplitcError("drawing needs Graphviz's dot (Debian: apt install graphviz)") from None
    path.write_bytes(data)
    return path
