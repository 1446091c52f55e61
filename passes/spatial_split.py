"""Spatial split: a chain of row-local layers divided into row tiles, fused over several layers.

As in DeepThings' fused tile partitioning: device ``k`` owns rows ``[a_k, b_k)`` of a segment's
outputs and computes, layer by layer backwards, exactly the rows those need — its own rows
plus *halo* rows that overlap its neighbours'. Inside a tile each convolution or pooling keeps
the original padding only where the tile touches the image border, so the answer is exact.
Between segments a device receives from each neighbour only the rows it lacks; layers that are
not row-local (global pooling, reshapes, dense layers) run on device 0 on whole tensors.

Row-local ops: NCHW ``conv2d`` (any stride, padding, dilation, groups), NCHW max/avg pooling,
elementwise ops (with per-channel constants or with another tensor of the same height), and
channel concatenation.

:func:`plan_spatial` is the analysis (which binding ranges become tiled segments);
:class:`SpatialSplit` applies a :class:`SpatialPlan` and hands the device assignment to
:class:`~splitc.passes.outline.OutlinePieces`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError

from .analysis import op_flops
from .channel_split import BINARY_ELEMENTWISE, UNARY_ELEMENTWISE, even_bounds
from .ir import (
    const_array,
    copy_helpers,
    is_tensor,
    main_block,
    op_name,
    output_vars,
    static_shape,
    substitute,
    var_inputs,
)
from .outline import OutlinePieces

WINDOWED = {"nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d"}
#: A segment grows while its tiles' total FLOPs stay within this factor of the untiled FLOPs.
MAX_HALO_OVERHEAD = 1.25

Rows = tuple[int, int]


@dataclass(frozen=True)
class SpatialPlan:
    """Binding ranges ``[start, end)`` of ``main`` to tile across ``n_devices`` row tiles."""

    n_devices: int
    segments: tuple[tuple[int, int], ...]


def _height(expr) -> int | None:
    shape = static_shape(expr)
    return shape[2] if len(shape) == 4 else None


def row_local(binding: relax.VarBinding) -> bool:
    """Whether output row ``r`` of this binding depends only on a window of input rows."""
    call, name = binding.value, op_name(binding.value)
    if not isinstance(call, relax.Call) or not is_tensor(binding.var):
        return False
    if _height(binding.var) is None:
        return False
    if name == "nn.conv2d":
        a = call.attrs
        return a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
    if name in ("nn.max_pool2d", "nn.avg_pool2d"):
        a = call.attrs
        if a.layout != "NCHW" or a.out_layout != "NCHW":
            return False
        # with ceil_mode, avg pooling that counts padding divides by a window we cannot rebuild
        return not (name == "nn.avg_pool2d" and a.ceil_mode and a.count_include_pad)
    if name == "concat":
        return int(call.attrs.axis) % 4 == 1
    if name in UNARY_ELEMENTWISE or name in BINARY_ELEMENTWISE or name == "clip":
        out_h = _height(binding.var)
        for arg in call.args:
            if isinstance(arg, relax.Var) and is_tensor(arg):
                shape = static_shape(arg)
                if len(shape) != 4 or shape[2] not in (1, out_h):
                    return False
        return True
    return False


def _window(call) -> tuple[int, int, int, int]:
    """(kernel rows, stride, dilation, top padding) of a conv or pool along the height."""
    a = call.attrs
    if op_name(call) == "nn.conv2d":
        kernel = static_shape(call.args[1])[2]
    else:
        kernel = int(a.pool_size[0])
    return kernel, int(a.strides[0]), int(a.dilation[0]), int(a.padding[0])


def input_rows(call, out: Rows, in_height: int) -> tuple[Rows, int, int]:
    """Input rows a windowed op needs for output rows ``out``, and the tile's top and bottom
    padding (the original's only where the window runs past the image border)."""
    kernel, stride, dilation, pad = _window(call)
    lo = out[0] * stride - pad
    hi = (out[1] - 1) * stride - pad + (kernel - 1) * dilation + 1
    return (max(lo, 0), min(hi, in_height)), max(0, -lo), max(0, hi - in_height)


def _union(a: Rows | None, b: Rows) -> Rows:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def tile_needs(bindings: list[relax.VarBinding], own: dict[relax.Var, Rows]
               ) -> dict[relax.Var, Rows]:
    """Backwards through a segment: the rows of every tensor one tile must have, given the
    rows ``own`` it must produce of the segment's outputs."""
    need: dict[relax.Var, Rows] = dict(own)
    for b in reversed(bindings):
        rows = need.get(b.var)
        if rows is None:
            continue
        call = b.value
        windowed = op_name(call) in WINDOWED
        for arg in var_inputs(call):
            if not is_tensor(arg) or _height(arg) is None:
                continue
            h = _height(arg)
            if windowed and not arg.same_as(call.args[0]):
                continue  # weights are not tiled
            if windowed:
                r = input_rows(call, rows, h)[0]
            elif h == 1:
                continue  # broadcast along rows: the whole (one-row) tensor
            else:
                r = rows
            need[arg] = _union(need.get(arg), r)
    return need


def segment_outputs(bindings, start, end, func) -> list[relax.Var]:
    """Variables defined in ``bindings[start:end]`` and read after it (or returned)."""
    inside = {b.var for b in bindings[start:end]}
    later = {v for b in bindings[end:] for v in var_inputs(b.value)} | set(output_vars(func))
    return [b.var for b in bindings[start:end] if b.var in inside & later]


def tiled_flops(bindings, start, end, func, n) -> tuple[float, float]:
    """(FLOPs of all tiles together, FLOPs untiled) of one candidate segment."""
    seg = bindings[start:end]
    outs = segment_outputs(bindings, start, end, func)
    plain = tiled = 0.0
    for k in range(n):
        own = {v: even_bounds(_height(v), n)[k] for v in outs
               if k < len(even_bounds(_height(v), n))}
        need = tile_needs(seg, own)
        for b in seg:
            full = op_flops(b.value, static_shape(b.var))
            if k == 0:
                plain += full
            if b.var in need:
                lo, hi = need[b.var]
                tiled += full * (hi - lo) / _height(b.var)
    return tiled, plain


def plan_spatial(mod: tvm.IRModule, n_devices: int) -> SpatialPlan:
    """Tile maximal runs of row-local layers, starting a new segment when the halo rows would
    cost more than :data:`MAX_HALO_OVERHEAD`. A segment whose outputs have fewer rows than
    devices is tiled over as many devices as it has rows; one with a single row, or with no
    convolution or pooling, is left whole on device 0."""
    if n_devices < 1:
        raise SplitcError("a spatial split needs at least one device")
    func = mod["main"]
    bindings = list(main_block(mod).bindings)
    local = [row_local(b) for b in bindings]
    segments = []
    i = 0
    while i < len(bindings):
        if not local[i]:
            i += 1
            continue
        end = i + 1
        while end < len(bindings) and local[end]:
            tiled, plain = tiled_flops(bindings, i, end + 1, func, n_devices)
            if plain and tiled > MAX_HALO_OVERHEAD * plain:
                break
            end += 1
        outs = segment_outputs(bindings, i, end, func)
        windowed = any(op_name(b.value) in WINDOWED for b in bindings[i:end])
        if windowed and outs and all(_height(v) >= min(2, n_devices) for v in outs):
            segments.append((i, end))
        i = end
    return SpatialPlan(n_devices, tuple(segments))


@dataclass(frozen=True)
class _Tile:
    own: Rows  # rows this tile is responsible for (the tiles' own rows partition the tensor)
    have: Rows  # rows it computed (own plus halo needed inside its segment)
    var: relax.Var
    device: int


class _SpatialRewriter:
    """Emits the tiled ``main`` and records which device computes each new binding."""

    def __init__(self, plan: SpatialPlan):
        self.plan = plan
        self.bb = relax.BlockBuilder()
        self.whole: dict[relax.Var, tuple[relax.Var, int | None]] = {}  # var -> (new, device)
        self.tiles: dict[relax.Var, list[_Tile]] = {}
        self.gathered: dict[tuple[relax.Var, int, Rows], relax.Var] = {}
        self.device_of: dict[str, int] = {}
        self.count = 0

    def emit(self, value, name: str, device: int) -> relax.Var:
        self.count += 1
        unique = f"{name}_{self.count}" if name in self.device_of else name
        var = self.bb.emit(value, name_hint=unique)
        self.device_of[var.name] = device
        return var

    @staticmethod
    def _slice(value, lo: int, hi: int, height: int):
        if (lo, hi) == (0, height):
            return None
        return relax.op.strided_slice(value, axes=[2], begin=[lo], end=[hi])

    def rows_on(self, var: relax.Var, rows: Rows, device: int) -> relax.Var:
        """Rows ``rows`` of ``var`` as a tensor usable on ``device``."""
        key = (var, device, rows)
        if key in self.gathered:
            return self.gathered[key]
        if var in self.tiles:
            parts = []
            for t in self.tiles[var]:
                lo, hi = max(rows[0], t.own[0]), min(rows[1], t.own[1])
                if lo >= hi:
                    continue
                sliced = self._slice(t.var, lo - t.have[0], hi - t.have[0],
                                     t.have[1] - t.have[0])
                parts.append(t.var if sliced is None else
                             self.emit(sliced, f"{var.name}_rows{device}", t.device))
            out = parts[0] if len(parts) == 1 else self.emit(
                relax.op.concat(parts, axis=2), f"{var.name}_g{device}", device)
        else:
            new, where = self.whole[var]
            sliced = self._slice(new, rows[0], rows[1], _height(var))
            # slice where the tensor lives, so only the rows travel (model inputs: at the tile)
            out = new if sliced is None else self.emit(
                sliced, f"{var.name}_rows{device}", device if where is None else where)
        self.gathered[key] = out
        return out

    def whole_on(self, var: relax.Var, device: int) -> relax.Var:
        if var in self.tiles:
            return self.rows_on(var, (0, _height(var)), device)
        return self.whole[var][0]

    def segment(self, func, bindings, start, end) -> None:
        n = self.plan.n_devices
        seg = bindings[start:end]
        outs = segment_outputs(bindings, start, end, func)
        new_tiles: dict[relax.Var, list[_Tile]] = {v: [] for v in outs}
        for k in range(n):
            own = {v: even_bounds(_height(v), n)[k] for v in outs
                   if k < len(even_bounds(_height(v), n))}
            if not own:
                continue
            need = tile_needs(seg, own)
            have: dict[relax.Var, tuple[relax.Var, Rows]] = {}
            for b in seg:
                if b.var not in need:
                    continue
                rows = need[b.var]
                call = b.value
                args = []
                for arg in call.args:
                    args.append(self._tile_arg(arg, call, rows, have, need, k))
                value = self._tile_op(call, args, rows)
                have[b.var] = (self.emit(value, f"{b.var.name}_t{k}", k), rows)
            for v in own:
                new_tiles[v].append(_Tile(own[v], have[v][1], have[v][0], k))
        self.tiles.update(new_tiles)

    def _tile_arg(self, arg, call, rows, have, need, k):
        """One argument of a tiled op: the rows of it the op needs, on device ``k``."""
        if isinstance(arg, relax.Tuple):  # concat
            return relax.Tuple([self._tile_arg(f, call, rows, have, need, k) for f in arg.fields])
        if not isinstance(arg, relax.Var) and not isinstance(arg, tvm.ir.GenericConst):
            return arg
        if op_name(call) in WINDOWED and not arg.same_as(call.args[0]):  # the weights
            return self.whole_on(arg, k) if isinstance(arg, relax.Var) else arg
        h = _height(arg) if is_tensor(arg) else None
        if h is None or h == 1:
            return self.whole_on(arg, k) if isinstance(arg, relax.Var) else arg
        if op_name(call) in WINDOWED and arg.same_as(call.args[0]):
            want = input_rows(call, rows, h)[0]
        else:
            want = rows
        if isinstance(arg, tvm.ir.GenericConst):
            return relax.const(np.ascontiguousarray(const_array(arg)[:, :, want[0]:want[1]]))
        if arg in have:
            var, got = have[arg]
            sliced = self._slice(var, want[0] - got[0], want[1] - got[0], got[1] - got[0])
            return var if sliced is None else self.emit(sliced, f"{arg.name}_s{k}", k)
        return self.rows_on(arg, want, k)

    @staticmethod
    def _tile_op(call, args, rows):
        name = op_name(call)
        if name not in WINDOWED:
            return relax.Call(call.op, args, call.attrs, call.ty_args)
        h = _height(call.args[0])
        _, top, bottom = input_rows(call, rows, h)
        a = call.attrs
        padding = [top, int(a.padding[1]), bottom, int(a.padding[3])]
        if name == "nn.conv2d":
            return relax.op.nn.conv2d(
                args[0], args[1], strides=a.strides, padding=padding, dilation=a.dilation,
                groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype=a.out_dtype)
        pool = relax.op.nn.max_pool2d if name == "nn.max_pool2d" else relax.op.nn.avg_pool2d
        kwargs = {} if name == "nn.max_pool2d" else {"count_include_pad": a.count_include_pad}
        return pool(args[0], pool_size=a.pool_size, strides=a.strides, padding=padding,
                    dilation=a.dilation, ceil_mode=False, layout=a.layout,
                    out_layout=a.out_layout, **kwargs)

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        bindings = list(main_block(mod).bindings)
        starts = {s: e for s, e in self.plan.segments}
        params = [relax.Var(p.name, p.ty) for p in func.params]
        attrs = dict(func.attrs.items()) if func.attrs else {}
        with self.bb.function("main", params, attrs=attrs):
            for p, new in zip(func.params, params, strict=True):
                self.whole[p] = (new, None)
            with self.bb.dataflow():
                i = 0
                while i < len(bindings):
                    if i in starts:
                        self.segment(func, bindings, i, starts[i])
                        i = starts[i]
                        continue
                    b = bindings[i]
                    vmap = {v: self.whole_on(v, 0) for v in var_inputs(b.value)
                            if v in self.whole or v in self.tiles}
                    self.whole[b.var] = (self.emit(substitute(b.value, vmap), b.var.name, 0), 0)
                    i += 1
                results = []
                for v in output_vars(func):
                    out = self.bb.emit_output(self.whole_on(v, 0), name_hint=f"{v.name}_out")
                    self.device_of[out.name] = 0
                    results.append(out)
            self.bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
        return copy_helpers(mod, self.bb.get())


@tvm.transform.module_pass(opt_level=0, name="splitc.SpatialSplit")
class SpatialSplit:
    """Apply a :class:`SpatialPlan`: tile the planned segments' rows across devices.

    Parameters
    ----------
    plan : SpatialPlan
        The binding ranges to tile and the number of devices.
    """

    def __init__(self, plan: SpatialPlan):
        if plan.n_devices < 1:
            raise SplitcError("a spatial split needs at least one device")
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _SpatialRewriter(self.plan)
        flat = rewriter.run(mod)
        return OutlinePieces(rewriter.device_of)(flat)
