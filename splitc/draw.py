"""``splitc inspect OUT --draw plan.svg``: devices as columns, their pieces in run order, what
the client sends each device, and every transfer as an arrow labelled with its size. Plain
SVG, no dependencies."""

from __future__ import annotations

from html import escape
from pathlib import Path

from splitc import optional
from splitc.report import human_bytes
from splitc.runtime.plan import Plan

COL_W, BOX_W, BOX_H, ROW_H, TOP = 260, 180, 44, 78, 70


def plan_svg(plan: Plan) -> str:
    col = {d.name: i for i, d in enumerate(plan.devices)}
    row: dict[str, int] = {}
    where: dict[str, tuple[float, float]] = {}  # tensor -> (x, y) of its producing box bottom
    boxes, arrows = [], []
    for i, p in enumerate(plan.pieces):
        row[p.name] = i
        x = 40 + col[p.device] * COL_W + (COL_W - BOX_W) / 2
        y = TOP + i * ROW_H
        boxes.append(
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="#e8f0fe" stroke="#3367d6"/>'
            f'<text x="{x + BOX_W / 2}" y="{y + 18}" text-anchor="middle" '
            f'font-weight="bold">{escape(p.name)}</text>'
            f'<text x="{x + BOX_W / 2}" y="{y + 35}" text-anchor="middle" font-size="11">'
            f'{p.flops / 1e6:,.1f} MFLOP, {escape(human_bytes(p.weight_bytes))} weights</text>')
        for t in p.outputs:
            where[t] = (x + BOX_W / 2, y + BOX_H)
    by_dst = {}
    for p in plan.pieces:
        for t in p.inputs:
            by_dst.setdefault((t, p.device), p)
    for t in plan.transfers:
        consumer = by_dst.get((t.tensor, t.dst))
        if consumer is None or t.tensor not in where:
            continue
        x1, y1 = where[t.tensor]
        x2 = 40 + col[t.dst] * COL_W + COL_W / 2
        y2 = TOP + row[consumer.name] * ROW_H
        arrows.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#d93025" '
            f'stroke-width="1.5" marker-end="url(#arrow)"/>'
            f'<text x="{(x1 + x2) / 2 + 4}" y="{(y1 + y2) / 2}" font-size="10" fill="#d93025">'
            f'{escape(t.tensor)} {escape(human_bytes(t.nbytes))}</text>')
    heads = "".join(
        f'<text x="{40 + i * COL_W + COL_W / 2}" y="40" text-anchor="middle" font-size="15" '
        f'font-weight="bold">{escape(d.name)} ({escape(d.target)})</text>'
        f'<line x1="{40 + i * COL_W + COL_W / 2}" y1="50" '
        f'x2="{40 + i * COL_W + COL_W / 2}" y2="{TOP + len(plan.pieces) * ROW_H}" '
        f'stroke="#ccc" stroke-dasharray="4"/>'
        for i, d in enumerate(plan.devices))
    sent = set(plan.client_tensors)  # what the client sends each device (inputs, slices)
    for i, d in enumerate(plan.devices):
        reads = sorted({t for p in plan.pieces_on(d.name) for t in p.inputs} & sent)
        if reads:
            nbytes = sum(plan.tensors[t].nbytes for t in reads)
            heads += (f'<text x="{40 + i * COL_W + COL_W / 2}" y="62" text-anchor="middle" '
                      f'font-size="10" fill="#188038">from client: {escape(", ".join(reads))} '
                      f'{escape(human_bytes(nbytes))}</text>')
    width = 80 + len(plan.devices) * COL_W
    height = TOP + len(plan.pieces) * ROW_H + 40
    footer = (f'<text x="20" y="{height - 12}" font-size="12">{escape(plan.strategy)} split of '
              f'{escape(plan.source)}: {len(plan.transfers)} transfers, '
              f'{escape(human_bytes(plan.transfer_bytes))} per inference</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="12">'
            '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" '
            'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#d93025"/></marker></defs>'
            f'<rect width="100%" height="100%" fill="white"/>{heads}{"".join(boxes)}'
            f'{"".join(arrows)}{footer}</svg>')


def draw(plan: Plan, path: str | Path) -> Path:
    """Write the plan's picture to ``path`` (.svg; .png too when cairosvg is installed)."""
    path = Path(path)
    svg = plan_svg(plan)
    if path.suffix == ".png":
        optional.cairosvg().svg2png(bytestring=svg.encode(), write_to=str(path))
    else:
        path.write_text(svg)
    return path
