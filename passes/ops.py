"""What the split passes know about operators, in one place: which act element by element,
which per channel, which reduce; and how a dimension is cut into contiguous ranges."""

from __future__ import annotations

from splitc.errors import SplitcError

#: Ops that act on each element independently: a channel slice in, the same slice out.
UNARY_ELEMENTWISE = {
    "nn.relu", "nn.relu6", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.leakyrelu", "sigmoid",
    "tanh", "clip", "exp", "log", "sqrt", "rsqrt", "negative", "abs", "erf", "square",
    "astype", "nn.dropout", "floor", "ceil", "round", "nn.prelu_scalar",
}
BINARY_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "power"}
#: Ops that act on each channel of an NCHW tensor independently.
PER_CHANNEL_NCHW = {"nn.max_pool2d", "nn.avg_pool2d", "nn.adaptive_avg_pool2d"}
REDUCTIONS = {"mean", "sum", "max", "min"}


def even_bounds(size: int, parts: int, align: int = 1) -> tuple[tuple[int, int], ...]:
    """``parts`` contiguous ranges covering ``range(size)``, sizes equal within ``align``."""
    units = size // align
    parts = max(1, min(parts, units))
    edges = [round(i * units / parts) * align for i in range(parts + 1)]
    return tuple((edges[i], edges[i + 1]) for i in range(parts))


def share_bounds(size: int, shares: tuple[float, ...]) -> tuple[tuple[int, int], ...]:
    """One contiguous range of ``range(size)`` per share, sized in proportion to it (a
    share too small for one unit gets an empty range ``(e, e)``)."""
    total = float(sum(shares))
    if not shares or total <= 0 or min(shares) < 0:
        raise SplitcError(f"shares must be non-negative with a positive sum, got {shares}")
    cum = [0.0]
    for s in shares:
        cum.append(cum[-1] + s)
    edges = [round(c / total * size) for c in cum]
    return tuple((edges[i], edges[i + 1]) for i in range(len(shares)))
