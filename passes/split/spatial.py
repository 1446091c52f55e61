"""Spatial split: a chain of row-local layers divided into row tiles, fused over several layers.

As in DeepThings' fused tile partitioning, device ``k`` owns rows ``[a_k, b_k)`` of a segment's
outputs and computes, layer by layer, exactly the rows those need: its own rows plus *halo*
rows that overlap its neighbours'. The rows a tile needs are propagated backwards through the
segment (a tensor read by several ops needs the union); a convolution or pooling whose output
rows are ``[a, b)`` reads input rows ``[a*s - pad_top, (b-1)*s - pad_top + (kh-1)*d + 1)``,
clipped to the image. Inside a tile each convolution or pooling keeps the original padding only
where its window runs past the image border (zero inside), so the answer is exact.

Between segments a device receives from each neighbour only the rows it lacks (sliced where
they were computed, concatenated where they are used). A whole tensor that a tile reads only in
part is sliced where it lives, so only the rows travel; a model input is cut by the caller
(device :data:`~splitc.passes.ir.CLIENT`), which sends each device just the rows its tile
reads. Layers that are not row-local (reshapes, dense layers) run on one *home* device
(device 0 at the start; after a segment, a device of its group that owns none of its rows
when its tiles run out of rows, else the group's first: :func:`home_after`) on whole tensors,
gathering (concatenating along the rows) what they read; a mean, sum or max over the rows (a
global pool) is instead reduced on each tile, and only the partial results travel.

Row-local ops: NCHW ``conv2d`` (any stride, padding, dilation, groups), NCHW max/avg pooling
(``ceil_mode`` too, except an average that counts padding where ``ceil_mode`` adds a window),
elementwise ops whose other operands are per-channel (one row) or have the same rows, and
concatenation along any axis but the rows. Tensors of one row inside a segment (say, the
excitation of a squeeze-and-excitation block) are computed whole by every tile.

:func:`plan_spatial` is the analysis (which binding ranges become tiled segments);
:class:`SpatialSplit` applies a :class:`SpatialPlan` and hands the device assignment to
:class:`~splitc.passes.split.outline.OutlinePieces`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.analysis import op_flops
from splitc.passes.ir import (
    CLIENT,
    const_array,
    copy_helpers,
    is_tensor,
    main_block,
    op_name,
    output_vars,
    static_shape,
    substitute,
    typed,
    var_inputs,
)
from splitc.passes.ops import (
    BINARY_ELEMENTWISE,
    UNARY_ELEMENTWISE,
    even_bounds,
    share_bounds,
)
from splitc.passes.split.outline import OutlinePieces

#: Ops with a sliding window along the rows: their tiles read halo rows and re-pad.
WINDOWED = {"nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d"}
#: A segment grows while its tiles together compute at most this factor of the FLOPs of the
#: untiled segment (halo rows are recomputed by both neighbours; they grow with every fused
#: layer), so recomputation stays within 25% and a longer chain becomes several segments.
#: Lower caps mean less recomputation but more exchanges: ``--strategy auto`` prices
#: :data:`HALO_CAPS` and keeps the best.
MAX_HALO_OVERHEAD = 1.25
HALO_CAPS = (1.25, 1.15, 1.10, 1.05)

Rows = tuple[int, int]


@dataclass(frozen=True)
class SpatialPlan:
    """Binding ranges of ``main`` to tile into ``n_devices`` row tiles.

    Each segment ``(start, end)`` names bindings ``start .. end-1`` of ``main``'s block, all
    row-local (:func:`row_local`). Device ``k`` owns the ``k``-th of ``min(n_devices, rows)``
    near-equal row ranges of every tensor the segment hands on (:func:`segment_outputs`);
    devices past a tensor's row count own none of it. With ``shares`` (one per device, say
    each device's speed) the rows are divided in proportion instead, so a faster device gets
    more; a share too small for a row gets none.

    ``groups`` (one ``(lo, hi)`` per segment; default ``(0, n_devices)`` for all) tiles each
    segment over devices ``lo .. hi-1`` only: segments on disjoint groups form a pipeline of
    spatially split stages (each stage's rows regrouped at the hand-over), which keeps every
    device busy with requests in flight. Bindings in no segment run on the *home* device
    (:func:`home_after` the last segment before them; the first segment's group's first device
    at the start), which also gathers the outputs.
    """

    n_devices: int
    segments: tuple[tuple[int, int], ...]
    shares: tuple[float, ...] = ()
    groups: tuple[tuple[int, int], ...] = ()

    def group(self, i: int) -> tuple[int, int]:
        """The devices ``lo .. hi-1`` that tile segment ``i``."""
        return self.groups[i] if self.groups else (0, self.n_devices)


def home_after(group: tuple[int, int], owners: set[int], shares: tuple[float, ...] = ()
               ) -> int:
    """The device that runs what follows a segment tiled over ``group`` (and gathers, or
    combines a global pool's partial results): the last of the group's devices that own none
    of its output rows and are no slower than the group's first (by ``shares``, the devices'
    speeds, where given), where there is one (the tiles ran out of rows: that device waits
    through the segment, and holds the weights of none of its layers), else the first."""
    lo, hi = group

    def share(k: int) -> float:
        return shares[k] if shares else 1.0

    idle = [k for k in range(lo, hi) if k not in owners and share(k) >= share(lo)]
    return idle[-1] if idle else lo


# -- row geometry ------------------------------------------------------------------------------
def _height(expr: relax.Expr) -> int | None:
    """Rows (H) of a 4-D tensor; None for anything else."""
    if not is_tensor(expr):
        return None
    shape = static_shape(expr)
    return shape[2] if len(shape) == 4 else None


def _row_size(expr: relax.Expr) -> int | None:
    """Size of the axis of an operand that broadcasts against the rows of an NCHW result (its
    second-to-last); None for non-tensors, scalars and vectors."""
    if not is_tensor(expr):
        return None
    shape = static_shape(expr)
    return shape[-2] if len(shape) >= 2 else None


def _window(call: relax.Call, axis: int) -> tuple[int, int, int, int, int]:
    """(kernel, stride, dilation, pad before, pad after) of a conv or pool along the rows
    (``axis`` 0) or columns (``axis`` 1)."""
    a = call.attrs
    if op_name(call) == "nn.conv2d":
        kernel = static_shape(call.args[1])[2 + axis]
    else:
        kernel = int(a.pool_size[axis])
    return (kernel, int(a.strides[axis]), int(a.dilation[axis]), int(a.padding[axis]),
            int(a.padding[2 + axis]))


def _floor_size(call: relax.Call, axis: int) -> int:
    """Output size along ``axis`` of a windowed op without ``ceil_mode``."""
    kernel, stride, dilation, before, after = _window(call, axis)
    return _windows(static_shape(call.args[0])[2 + axis], kernel, stride, dilation,
                    before + after)


def _windows(size: int, kernel: int, stride: int, dilation: int, padding: int) -> int:
    """How many windows fit ``size`` rows (or columns) padded by ``padding`` in all."""
    return (size + padding - (kernel - 1) * dilation - 1) // stride + 1


def input_rows(call: relax.Call, out: Rows, in_height: int) -> tuple[Rows, int, int]:
    """Input rows a windowed op needs for output rows ``out``, and the tile's top and bottom
    padding: the window's overhang past the image border, none inside it."""
    kernel, stride, dilation, pad, _ = _window(call, 0)
    return _window_rows(kernel, stride, dilation, pad, out, in_height)


def _window_rows(kernel: int, stride: int, dilation: int, pad: int, out: Rows,
                 in_height: int) -> tuple[Rows, int, int]:
    lo = out[0] * stride - pad
    hi = (out[1] - 1) * stride - pad + (kernel - 1) * dilation + 1
    return (max(lo, 0), min(hi, in_height)), max(0, -lo), max(0, hi - in_height)


def _operands(call: relax.Call) -> list[relax.Expr]:
    """The arguments of ``call`` with a tuple argument (``concat``'s) spread out."""
    out = []
    for a in call.args:
        out.extend(a.fields if isinstance(a, relax.Tuple) else [a])
    return out


def _with_operands(call: relax.Call, operands: list[relax.Expr]) -> list[relax.Expr]:
    """``call``'s argument list with its operands (as :func:`_operands` lists them) replaced."""
    rest = iter(operands)
    return [relax.Tuple([next(rest) for _ in a.fields]) if isinstance(a, relax.Tuple)
            else next(rest) for a in call.args]


def operand_rows(call: relax.Call, index: int, operand: relax.Expr, out: Rows) -> Rows | None:
    """Rows of ``operand`` (operand ``index`` of ``call``) needed for output rows ``out``.

    ``None`` means the operand has no rows (scalars, vectors, attributes). Weights and
    per-channel operands (one row) are needed whole.
    """
    read = _read(call, index, operand)
    return None if read is None else _rows_read(read, out)


#: How an operand's rows follow from its reader's output rows (:func:`_read`): the rows of a
#: window ``(size, kernel, stride, dilation, top padding)``, all ``size`` rows
#: ``(size, None, ...)``, or the same rows ``(size, 0, ...)``.
_Read = tuple[int, int | None, int, int, int]


def _read(call: relax.Call, index: int, operand: relax.Expr) -> _Read | None:
    size = _row_size(operand)
    if size is None:
        return None
    if op_name(call) in WINDOWED:
        if index == 0:
            kernel, stride, dilation, pad, _ = _window(call, 0)
            return (size, kernel, stride, dilation, pad)
        return (size, None, 0, 0, 0)
    return (size, None, 0, 0, 0) if size == 1 else (size, 0, 0, 0, 0)


def _rows_read(read: _Read, out: Rows) -> Rows:
    size, kernel, stride, dilation, pad = read
    if kernel is None:
        return (0, size)
    if kernel == 0:
        return out
    return _window_rows(kernel, stride, dilation, pad, out, size)[0]


def row_local(binding: relax.VarBinding) -> bool:
    """Whether output row ``r`` of this binding depends only on a window of input rows."""
    call, name = binding.value, op_name(binding.value)
    if not isinstance(call, relax.Call) or _height(binding.var) is None:
        return False
    if name == "nn.conv2d":
        a = call.attrs
        return a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
    if name in ("nn.max_pool2d", "nn.avg_pool2d"):
        a = call.attrs
        if a.layout != "NCHW" or a.out_layout != "NCHW":
            return False
        # Tiles pool without ceil_mode, padding the last window instead. An average that counts
        # padding would count that extra padding: only safe when ceil_mode adds no window.
        shape = static_shape(binding.var)
        return not (name == "nn.avg_pool2d" and a.ceil_mode and a.count_include_pad and
                    (_floor_size(call, 0), _floor_size(call, 1)) != shape[2:])
    if name == "concat":
        return int(call.attrs.axis) % 4 != 2
    if name in UNARY_ELEMENTWISE or name in BINARY_ELEMENTWISE:
        out_h = _height(binding.var)
        for arg in _operands(call):
            size = _row_size(arg)
            if size is None or size == 1:
                continue
            # a tensor operand must line up row for row (constants can be sliced at any rank)
            if size != out_h or (isinstance(arg, relax.Var) and _height(arg) is None):
                return False
        return True
    return False


def _union(a: Rows | None, b: Rows) -> Rows:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


class RowGeometry:
    """What the row arithmetic asks of ``main``'s bindings again and again, read from the IR
    once: each binding's FLOPs and rows, how the rows of each variable it reads follow from
    its output rows, and where each variable is last read. :func:`plan_spatial` sizes a
    segment by trying every length (tens of thousands of questions on ResNet-50 at eight
    devices: read from the IR each time, they took seconds of ``--strategy auto``)."""

    def __init__(self, bindings: list[relax.VarBinding], func: relax.Function):
        self.bindings = bindings
        last: dict[relax.Var, int] = {}
        for i, b in enumerate(bindings):
            for v in var_inputs(b.value):
                last[v] = i
        for v in output_vars(func):
            last[v] = len(bindings)
        self.last_read = [last.get(b.var, -1) for b in bindings]
        self.flops = [op_flops(b.value, static_shape(b.var)) for b in bindings]
        self.height = [_height(b.var) for b in bindings]
        self.reads = [[(arg, read) for j, arg in enumerate(_operands(b.value))
                       if isinstance(arg, relax.Var)
                       and (read := _read(b.value, j, arg)) is not None]
                      for b in bindings]

    def outputs(self, start: int, end: int) -> list[relax.Var]:
        """Variables defined in ``bindings[start:end]`` and read after it (or returned)."""
        return [self.bindings[i].var for i in range(start, end) if self.last_read[i] >= end]

    def needs(self, start: int, end: int, own: dict[relax.Var, Rows]
              ) -> dict[relax.Var, Rows]:
        """Backwards through the segment ``[start, end)``: the rows of every tensor one tile
        must have, given the rows ``own`` it must produce of the segment's outputs. Tensors
        read from outside the segment are included (the rows the tile must receive)."""
        need: dict[relax.Var, Rows] = dict(own)
        for i in range(end - 1, start - 1, -1):
            rows = need.get(self.bindings[i].var)
            if rows is None:
                continue
            for arg, read in self.reads[i]:
                need[arg] = _union(need.get(arg), _rows_read(read, rows))
        return need

    def tiled_flops(self, start: int, end: int, n_devices: int,
                    shares: tuple[float, ...] = ()) -> tuple[float, float]:
        """(FLOPs of all tiles together, FLOPs untiled) of the segment ``[start, end)``."""
        outs = self.outputs(start, end)
        tiled = 0.0
        for k in range(n_devices):
            need = self.needs(start, end, own_rows(outs, n_devices, k, shares))
            for i in range(start, end):
                rows = need.get(self.bindings[i].var)
                if rows is not None:
                    tiled += self.flops[i] * (rows[1] - rows[0]) / self.height[i]
        return tiled, float(sum(self.flops[start:end]))


def own_rows(outputs: list[relax.Var], n_devices: int, k: int,
             shares: tuple[float, ...] = ()) -> dict[relax.Var, Rows]:
    """The rows device ``k`` owns of each segment output: its ``k``-th of ``n_devices`` near-equal
    ranges (none of an output shorter than ``k+1`` rows), or its part in proportion to
    ``shares`` (none if that part is empty)."""
    own = {}
    for v in outputs:
        bounds = share_bounds(_height(v), shares) if shares else \
            even_bounds(_height(v), n_devices)
        if k < len(bounds) and bounds[k][0] < bounds[k][1]:
            own[v] = bounds[k]
    return own


def _tileable(geo: RowGeometry, start: int, end: int) -> bool:
    """A segment worth tiling: it has a windowed op and hands on only tensors of at least two
    rows. One with fewer rows than devices is tiled over as many devices as it has rows (the
    rest idle): ResNet-50's last stage has 7 rows at 224x224, and 7 tiles beat one device."""
    outs = geo.outputs(start, end)
    return (bool(outs) and all(_height(v) >= 2 for v in outs)
            and any(op_name(b.value) in WINDOWED for b in geo.bindings[start:end]))


def plan_spatial(mod: tvm.IRModule, n_devices: int,
                 max_overhead: float = MAX_HALO_OVERHEAD,
                 shares: tuple[float, ...] = ()) -> SpatialPlan:
    """Cut the maximal runs of row-local bindings of ``main`` into tiled segments.

    Rule: a segment starts at a row-local binding and takes the next ones while the tiles
    together compute at most ``max_overhead`` (default 1.25x) the FLOPs of the untiled
    segment (FLOPs as :func:`splitc.passes.analysis.op_flops` counts them); the next binding
    then starts a new segment. A segment is then shortened to its longest prefix that is worth
    tiling (:func:`_tileable`: a convolution or pooling inside, every tensor it hands on at
    least two rows tall); when none is, its first binding runs on device 0 and the search goes
    on from the next. A segment whose outputs have fewer rows than devices is tiled over as
    many devices as it has rows. One device tiles nothing. ``shares``: see
    :class:`SpatialPlan`.
    """
    if n_devices < 1:
        raise SplitcError("a spatial split needs at least one device")
    func = mod["main"]
    bindings = list(main_block(mod).bindings)
    geo = RowGeometry(bindings, func)
    local = [row_local(b) for b in bindings]
    segments = []
    i = 0
    while n_devices > 1 and i < len(bindings):
        if not local[i]:
            i += 1
            continue
        end = i + 1
        while end < len(bindings) and local[end]:
            tiled, plain = geo.tiled_flops(i, end + 1, n_devices, shares)
            if plain and tiled > max_overhead * plain:
                break
            end += 1
        while end > i and not _tileable(geo, i, end):
            end -= 1
        if end == i:
            i += 1
            continue
        segments.append((i, end))
        i = end
    return SpatialPlan(n_devices, tuple(segments), tuple(shares))


def plan_spatial_stages(mod: tvm.IRModule, n_devices: int, stages: int,
                        max_overhead: float = MAX_HALO_OVERHEAD,
                        shares: tuple[float, ...] = ()) -> SpatialPlan:
    """A pipeline of ``stages`` spatially split stages: the segments :func:`plan_spatial` finds
    for a group's width, cut into ``stages`` runs of near-equal FLOPs; each run is tiled over
    its own group of consecutive devices, as many as its share of the FLOPs (at least one).
    With requests in flight every group works on a different request."""
    if not 1 <= stages <= n_devices:
        raise SplitcError(f"{stages} stages need 1 to {n_devices} devices each")
    width = max(1, round(n_devices / stages))
    base = plan_spatial(mod, width, max_overhead)
    if len(base.segments) < stages:
        return SpatialPlan(n_devices, base.segments, tuple(shares))
    bindings = list(main_block(mod).bindings)
    flops = [sum(op_flops(b.value, static_shape(b.var)) for b in bindings[s:e])
             for s, e in base.segments]
    total, run, cuts = float(sum(flops)) or 1.0, 0.0, []
    for i, f in enumerate(flops[:-1]):  # stage j ends after the segment nearest j/stages
        run += f
        if len(cuts) < stages - 1 and run >= total * (len(cuts) + 1) / stages - f / 2:
            cuts.append(i + 1)
    bounds = [0, *cuts, len(flops)]
    work = [sum(flops[bounds[j]:bounds[j + 1]]) for j in range(len(bounds) - 1)]
    sizes = [max(1, round(n_devices * w / total)) for w in work]
    while sum(sizes) > n_devices:
        sizes[sizes.index(max(sizes))] -= 1
    while sum(sizes) < n_devices:
        sizes[work.index(max(work))] += 1
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    groups = tuple((starts[j], starts[j] + sizes[j]) for j in range(len(sizes))
                   for _ in range(bounds[j], bounds[j + 1]))
    return SpatialPlan(n_devices, base.segments, tuple(shares), groups)


# -- the rewrite -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tile:
    own: Rows  # rows this tile is responsible for (the tiles' own rows partition the tensor)
    have: Rows  # rows it computed (own plus the halo needed inside its segment)
    var: relax.Var
    device: int


def _row_slice(value: relax.Expr, lo: int, hi: int) -> relax.Expr:
    return relax.op.strided_slice(value, axes=[2], begin=[lo], end=[hi])


def _tile_call(call: relax.Call, args: list[relax.Expr], rows: Rows,
               out: relax.Var) -> relax.Expr:
    """``call`` on tile operands ``args``, computing output rows ``rows`` of ``out``."""
    name = op_name(call)
    if name not in WINDOWED:
        return relax.Call(call.op, args, call.attrs, call.ty_args)
    a = call.attrs
    out_shape = static_shape(out)
    _, top, bottom = input_rows(call, rows, _height(call.args[0]))
    left, right = int(a.padding[1]), int(a.padding[3])
    if name == "nn.conv2d":
        tile = relax.op.nn.conv2d(
            args[0], args[1], strides=a.strides, padding=[top, left, bottom, right],
            dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
            kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype=a.out_dtype)
    else:
        if a.ceil_mode:  # pad the last column window instead (rows: input_rows already does)
            kernel, stride, dilation, _, _ = _window(call, 1)
            reach = (out_shape[3] - 1) * stride + (kernel - 1) * dilation + 1
            right = max(right, reach - static_shape(call.args[0])[3] - left)
        pool = relax.op.nn.max_pool2d if name == "nn.max_pool2d" else relax.op.nn.avg_pool2d
        tile = pool(args[0], pool_size=a.pool_size, strides=a.strides,
                    padding=[top, left, bottom, right], dilation=a.dilation, ceil_mode=False,
                    count_include_pad=a.count_include_pad, layout=a.layout,
                    out_layout=a.out_layout)
    # its type, as the op's inference would give it (which takes ~0.5 ms: see typed)
    shape = static_shape(args[0])
    size = [_windows(shape[2 + axis], *_window(call, axis)[:3], pad)
            for axis, pad in ((0, top + bottom), (1, left + right))]
    if size == [rows[1] - rows[0], out_shape[3]]:
        tile = typed(tile, relax.TensorType([*out_shape[:2], *size], out.ty.dtype))
    return tile


class SpatialRewriter:
    """Emits the tiled ``main`` and records which device computes each new binding."""

    def __init__(self, plan: SpatialPlan):
        self.plan = plan
        self.bb = relax.BlockBuilder()
        self.whole: dict[relax.Var, tuple[relax.Var, int | None]] = {}  # var -> (new, device)
        self.tiles: dict[relax.Var, list[_Tile]] = {}
        self.received: dict[tuple[relax.Var, int, Rows], relax.Var] = {}
        self.device_of: dict[str, int] = {}
        self.stage_of: dict[str, int] = {}  # the segment (or what follows it) a binding is of
        self.stage = 0
        self.reserved: set[str] = set()
        self.home = plan.group(0)[0] if plan.segments else 0  # runs what no segment holds
        #: every whole tensor gathered from tiles: its name -> the parts concatenated (a
        #: later rewrite may gather the same parts on another device instead of moving it)
        self.gathers: dict[str, list[relax.Var]] = {}

    # -- emission helpers ---------------------------------------------------------------
    def emit(self, value: relax.Expr, name: str, device: int, *, output: bool = False,
             original: bool = False, stage: int | None = None) -> relax.Var:
        """Bind ``value`` on ``device`` under a name no other binding or parameter has.

        ``original`` keeps an original binding's name; derived names avoid those. ``stage``:
        the current one unless given (rows cut from a tile belong to the tile's)."""
        unique, i = name, 0
        while unique in self.device_of or (unique in self.reserved and not original):
            i += 1
            unique = f"{name}_{i}"
        var = (self.bb.emit_output if output else self.bb.emit)(value, name_hint=unique)
        self.device_of[var.name] = device
        self.stage_of[var.name] = self.stage if stage is None else stage
        return var

    def rows_on(self, var: relax.Var, rows: Rows, device: int) -> relax.Var:
        """Rows ``rows`` of ``var`` (computed outside the current segment) on ``device``."""
        if var not in self.tiles and rows == (0, _height(var)):
            return self.whole[var][0]
        key = (var, device, rows)
        if key in self.received:
            return self.received[key]
        if var in self.tiles:  # from each tile, the rows it owns that overlap (sliced there)
            parts = []
            for t in self.tiles[var]:
                lo, hi = max(rows[0], t.own[0]), min(rows[1], t.own[1])
                if lo >= hi:
                    continue
                parts.append(t.var if (lo, hi) == t.have else self.emit(
                    _row_slice(t.var, lo - t.have[0], hi - t.have[0]),
                    f"{var.name}_r{device}", t.device, stage=self.stage_of[t.var.name]))
            out = parts[0] if len(parts) == 1 else self.emit(
                relax.op.concat(parts, axis=2), f"{var.name}_g{device}", device)
            if len(parts) > 1 and rows == (0, _height(var)):
                self.gathers[out.name] = parts
        else:  # sliced where it lives, so only the rows travel (model inputs: by the caller)
            new, where = self.whole[var]
            out = self.emit(_row_slice(new, *rows), f"{var.name}_r{device}",
                            CLIENT if where is None else where,
                            stage=self.stage_of.get(new.name, 0))
        self.received[key] = out
        return out

    def whole_on(self, var: relax.Var, device: int) -> relax.Var:
        """``var`` as a whole tensor usable on ``device`` (gathering its tiles there)."""
        if var in self.tiles:
            return self.rows_on(var, (0, _height(var)), device)
        return self.whole[var][0]

    def _tile_operand(self, arg: relax.Expr, want: Rows | None,
                      have: dict[relax.Var, tuple[relax.Var, Rows]], k: int) -> relax.Expr:
        """One operand of a tiled op on device ``k``: rows ``want`` of it (None: all)."""
        if isinstance(arg, relax.Var):
            if arg in have:  # computed by this tile: cut off rows this op does not read
                var, got = have[arg]
                if want is None or want == got:
                    return var
                return self.emit(_row_slice(var, want[0] - got[0], want[1] - got[0]),
                                 f"{arg.name}_s{k}", k)
            return self.whole_on(arg, k) if want is None else self.rows_on(arg, want, k)
        if isinstance(arg, tvm.ir.GenericConst) and want is not None \
                and want != (0, _row_size(arg)):
            value = const_array(arg)
            index = [slice(None)] * value.ndim
            index[-2] = slice(*want)
            return relax.const(np.ascontiguousarray(value[tuple(index)]))
        return arg

    # -- a reduction over the rows of a tiled tensor -------------------------------------
    def row_reduction(self, b: relax.VarBinding) -> relax.Var | None:
        """``mean``, ``sum`` or ``max`` over the rows of a tiled tensor (a global average pool,
        say): each tile reduces its own rows where it lives and only the partial results
        travel to the home device, which combines them. None if ``b`` is not such a
        reduction."""
        call = b.value
        name = op_name(call) if isinstance(call, relax.Call) else None
        if name not in ("mean", "sum", "max") or not isinstance(call.args[0], relax.Var) \
                or call.args[0] not in self.tiles or call.attrs.axis is None:
            return None
        x = call.args[0]
        axes = sorted(int(a) % 4 for a in call.attrs.axis)
        if 2 not in axes or str(x.ty.dtype) not in ("float32", "float64", "float16"):
            return None
        if len(self.tiles[x]) < 2:
            return None
        keep = bool(call.attrs.keepdims)
        shape = static_shape(x)
        combine = relax.op.maximum if name == "max" else relax.op.add
        parts = []
        for t in self.tiles[x]:
            own = t.var if t.own == t.have else self.emit(
                _row_slice(t.var, t.own[0] - t.have[0], t.own[1] - t.have[0]),
                f"{x.name}_o{t.device}", t.device)
            if name == "mean":  # (a mean kernel is scheduled where a sum is not): weight
                # each tile's mean by its share of the elements
                share = (t.own[1] - t.own[0]) / shape[2]
                mean = self.emit(relax.op.mean(own, axis=axes, keepdims=keep),
                                 f"{b.var.name}_m{t.device}", t.device)
                part = relax.op.multiply(mean, relax.const(share, str(x.ty.dtype)))
            else:
                part = (relax.op.max if name == "max" else relax.op.sum)(own, axis=axes,
                                                                         keepdims=keep)
            parts.append(self.emit(part, f"{b.var.name}_p{t.device}", t.device))
        total = parts[0]
        for p in parts[1:-1]:
            total = self.emit(combine(total, p), f"{b.var.name}_acc", self.home)
        return self.emit(combine(total, parts[-1]), b.var.name, self.home, original=True)

    # -- one segment ---------------------------------------------------------------------
    def segment(self, func: relax.Function, bindings: list[relax.VarBinding], start: int,
                end: int, group: tuple[int, int]) -> set[int]:
        """Tile bindings ``start .. end-1`` over the devices of ``group``; returns the
        devices that own rows of the segment's outputs."""
        lo, hi = group
        shares = self.plan.shares[lo:hi] if self.plan.shares else ()
        seg = bindings[start:end]
        outs = self.geo.outputs(start, end)
        tiles: dict[relax.Var, list[_Tile]] = {v: [] for v in outs}
        for j in range(hi - lo):
            k = lo + j  # the device
            own = own_rows(outs, hi - lo, j, shares)
            if not own:
                continue
            need = self.geo.needs(start, end, own)
            have: dict[relax.Var, tuple[relax.Var, Rows]] = {}
            for b in seg:
                rows = need.get(b.var)
                if rows is None:
                    continue
                operands = [self._tile_operand(arg, operand_rows(b.value, j, arg, rows), have, k)
                            for j, arg in enumerate(_operands(b.value))]
                value = _tile_call(b.value, _with_operands(b.value, operands), rows, b.var)
                have[b.var] = (self.emit(value, f"{b.var.name}_t{k}", k), rows)
            for v, rows in own.items():
                tiles[v].append(_Tile(rows, have[v][1], have[v][0], k))
        self.tiles.update(tiles)
        return {t.device for ts in tiles.values() for t in ts}

    # -- the whole function --------------------------------------------------------------
    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        bindings = list(main_block(mod).bindings)
        self.geo = RowGeometry(bindings, func)
        ends = dict(self.plan.segments)
        groups = {s: self.plan.group(i) for i, (s, _) in enumerate(self.plan.segments)}
        self.reserved = {p.name for p in func.params} | {b.var.name for b in bindings}
        params = [relax.Var(p.name, p.ty) for p in func.params]
        attrs = dict(func.attrs.items()) if func.attrs else {}
        with self.bb.function("main", params, attrs=attrs):
            for p, new in zip(func.params, params, strict=True):
                self.whole[p] = (new, None)
            with self.bb.dataflow():
                i = 0
                while i < len(bindings):
                    if i in ends:
                        self.stage += 1
                        owners = self.segment(func, bindings, i, ends[i], groups[i])
                        self.home = home_after(groups[i], owners, self.plan.shares)
                        self.stage += 1  # what follows the segment, on the home device
                        i = ends[i]
                        continue
                    b = bindings[i]
                    new = self.row_reduction(b)
                    if new is None:
                        vmap = {v: self.whole_on(v, self.home) for v in var_inputs(b.value)
                                if v in self.whole or v in self.tiles}
                        new = self.emit(substitute(b.value, vmap), b.var.name, self.home,
                                        original=True)
                    self.whole[b.var] = (new, self.home)
                    i += 1
                results = [self.emit(self.whole_on(v, self.home), f"{v.name}_out", self.home,
                                     output=True) for v in output_vars(func)]
            self.bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
        return copy_helpers(mod, self.bb.get())


def check_plan(plan: SpatialPlan, mod: tvm.IRModule) -> None:
    """A plan's segments must be ordered, disjoint runs of row-local bindings of ``main``."""
    bindings = list(main_block(mod).bindings)
    if plan.groups and (len(plan.groups) != len(plan.segments) or not all(
            0 <= lo < hi <= plan.n_devices for lo, hi in plan.groups)):
        raise SplitcError(f"spatial plan groups {plan.groups} must give one device range "
                          f"within 0..{plan.n_devices - 1} to each of its "
                          f"{len(plan.segments)} segments")
    last = 0
    for start, end in plan.segments:
        if not last <= start < end <= len(bindings):
            raise SplitcError(f"spatial segment ({start}, {end}) is out of order or out of "
                              f"range for {len(bindings)} bindings")
        bad = [b.var.name for b in bindings[start:end] if not row_local(b)]
        if bad:
            raise SplitcError(f"spatial segment ({start}, {end}) holds bindings that are not "
                              f"row-local: {bad[:5]}")
        last = end


@tvm.transform.module_pass(opt_level=0, name="splitc.SpatialSplit")
class SpatialSplit:
    """Apply a :class:`SpatialPlan`: tile the planned segments' rows across devices.

    Parameters
    ----------
    plan : SpatialPlan
        The binding ranges to tile and the number of devices.

    Returns
    -------
    tvm.IRModule
        The split form: one function per piece (a device's run of bindings between
        exchanges) and a ``main`` calling them (see :mod:`splitc.passes.split.outline`).
    """

    def __init__(self, plan: SpatialPlan):
        if plan.n_devices < 1:
            raise SplitcError("a spatial split needs at least one device")
        if plan.shares and len(plan.shares) != plan.n_devices:
            raise SplitcError(f"a spatial plan over {plan.n_devices} devices needs as many "
                              f"shares, got {len(plan.shares)}")
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        check_plan(self.plan, mod)
        rewriter = SpatialRewriter(self.plan)
        flat = rewriter.run(mod)
        return OutlinePieces(rewriter.device_of, rewriter.stage_of)(flat)
