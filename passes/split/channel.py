"""Channel split: a layer's output channels divided across devices, gathered where needed.

A split convolution (or matmul) runs on every device with that device's slice of the filters
and writes that device's slice of the channels. Operations that work channel by channel
(elementwise ops, per-channel bias, pooling, depthwise and aligned grouped convolutions,
reductions over other axes) then run on the slices where they lie. An operation that mixes
channels (the next full convolution, a reshape, a softmax over channels) needs the whole
tensor: the slices are *gathered* (concatenated) on the device that runs it. The next split
convolution gathers on every device, so a chain of split convolutions is the classic
channel-parallel all-gather after every layer.

:func:`plan_channel` is the analysis (which layers to split, into how many parts);
:class:`ChannelSplit` applies a :class:`ChannelPlan` and hands the device assignment to
:class:`~splitc.passes.split.outline.OutlinePieces`. Anything that is not split runs on device 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.ir import (
    const_array,
    copy_helpers,
    main_block,
    op_name,
    output_vars,
    rebound,
    static_shape,
    typed,
    var_inputs,
)
from splitc.passes.ops import (
    BINARY_ELEMENTWISE,
    PER_CHANNEL_NCHW,
    REDUCTIONS,
    UNARY_ELEMENTWISE,
    even_bounds,
)
from splitc.passes.split.outline import OutlinePieces


@dataclass(frozen=True)
class ChannelPlan:
    """Which bindings of ``main`` to split, and across how many devices.

    ``layers`` names convolution/matmul bindings (by variable name); each is split into at most
    ``n_devices`` parts of near-equal size (grouped convolutions at group boundaries).
    """

    n_devices: int
    layers: frozenset[str]


def splittable(call: relax.Expr) -> bool:
    """A convolution or matmul whose weights are constants (so slices can be cut from them)."""
    name = op_name(call)
    if name == "nn.conv2d":
        return isinstance(call.args[1], tvm.ir.GenericConst) and call.attrs.data_layout == "NCHW" \
            and call.attrs.kernel_layout == "OIHW"
    if name == "matmul":
        weight = call.args[1]
        return isinstance(weight, tvm.ir.GenericConst) and len(static_shape(weight)) == 2
    return False


def plan_channel(mod: tvm.IRModule, n_devices: int) -> ChannelPlan:
    """Split every convolution and matmul with at least ``n_devices`` output channels."""
    layers = set()
    for b in main_block(mod).bindings:
        if not splittable(b.value):
            continue
        shape = static_shape(b.var)
        channels = shape[1] if op_name(b.value) == "nn.conv2d" else shape[-1]
        if channels >= n_devices:
            layers.add(b.var.name)
    return ChannelPlan(n_devices, frozenset(layers))


@dataclass(frozen=True)
class _Full:
    var: relax.Var
    device: int | None  # None: a model input, available to every device


@dataclass(frozen=True)
class _Split:
    axis: int
    bounds: tuple[tuple[int, int], ...]
    parts: tuple[relax.Var, ...]  # part k lives on device k


class ChannelRewriter:
    """Emits the split ``main`` and records which device computes each new binding."""

    def __init__(self, plan: ChannelPlan, home: Mapping[str, int] | None = None,
                 gathers: Mapping[str, Sequence[relax.Var]] | None = None):
        self.plan = plan
        self.home = home or {}  # the device of each binding the plan does not split
        # whole tensors concatenated from row tiles (a spatial rewrite's): on another device
        # the same parts are concatenated there, rather than the whole moved from its home
        self.gathers = gathers or {}
        self.bb = relax.BlockBuilder()
        self.state: dict[relax.Var, _Full | _Split] = {}
        self.gathered: dict[tuple[relax.Var, int], relax.Var] = {}
        self.device_of: dict[str, int] = {}

    # -- emission helpers ---------------------------------------------------------------
    def emit(self, value: relax.Expr, name: str, device: int) -> relax.Var:
        var = self.bb.emit(value, name_hint=name)
        self.device_of[var.name] = device
        return var

    def full_on(self, var: relax.Var, device: int) -> relax.Var:
        """``var`` as a whole tensor usable on ``device`` (gathering slices there once)."""
        st = self.state[var]
        if isinstance(st, _Full):
            if var.name in self.gathers and device != st.device:
                key = (var, device)
                if key not in self.gathered:
                    parts = [self.state[p].var for p in self.gathers[var.name]]
                    self.gathered[key] = self.emit(relax.op.concat(parts, axis=2),
                                                   f"{var.name}_at{device}", device)
                return self.gathered[key]
            return st.var
        if len(st.parts) == 1:
            return st.parts[0]
        key = (var, device)
        if key not in self.gathered:
            self.gathered[key] = self.emit(relax.op.concat(list(st.parts), axis=st.axis),
                                           f"{var.name}_g{device}", device)
        return self.gathered[key]

    # -- one original binding --------------------------------------------------------------
    def rewrite(self, binding: relax.VarBinding) -> None:
        call, var = binding.value, binding.var
        name = op_name(call)
        handlers = [self._grouped_conv, self._split_layer, self._elementwise, self._reduction]
        for handler in handlers:
            result = handler(var, call, name)
            if result is not None:
                self.state[var] = result
                return
        self.state[var] = self._on_home(var, call)

    def _on_home(self, var, call) -> _Full:
        device = self.home.get(var.name, 0)
        vmap = {v: self.full_on(v, device) for v in var_inputs(call) if v in self.state}
        return _Full(self.emit(rebound(call, vmap, var.ty), var.name, device), device)

    def _split_layer(self, var, call, name):
        if var.name not in self.plan.layers or name not in ("nn.conv2d", "matmul"):
            return None
        w = const_array(call.args[1])
        if name == "nn.conv2d":
            groups = int(call.attrs.groups)
            axis, out_c = 1, w.shape[0]
            bounds = even_bounds(out_c, self.plan.n_devices, out_c // groups if groups > 1 else 1)
        else:
            axis, out_c = len(static_shape(var)) - 1, w.shape[1]
            bounds = even_bounds(out_c, self.plan.n_devices)
        parts = []
        for k, (lo, hi) in enumerate(bounds):
            x = self.full_on(call.args[0], k)
            if name == "matmul":
                value = relax.op.matmul(x, relax.const(w[:, lo:hi]), out_dtype=call.attrs.out_dtype)
            else:
                groups = int(call.attrs.groups)
                if groups > 1:  # only the input channels of this part's groups
                    per_in, per_out = w.shape[1], w.shape[0] // groups
                    x = self.emit(relax.op.strided_slice(
                        x, axes=[1], begin=[lo // per_out * per_in], end=[hi // per_out * per_in]),
                        f"{var.name}_in{k}", k)
                value = self._conv_slice(var, call, x, w, lo, hi)
            parts.append(self.emit(value, f"{var.name}_c{k}", k))
        return _Split(axis, bounds, tuple(parts))

    def _conv_slice(self, var, call, x, w, lo, hi):
        """Output channels ``lo:hi`` of ``var``, a (grouped) conv2d, whose input ``x`` holds
        exactly the input channels those output channels read."""
        a = call.attrs
        groups = (hi - lo) // (w.shape[0] // int(a.groups)) if int(a.groups) > 1 else 1
        conv = relax.op.nn.conv2d(
            x, relax.const(w[lo:hi]), strides=a.strides, padding=a.padding,
            dilation=a.dilation, groups=groups, data_layout=a.data_layout,
            kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype=a.out_dtype)
        nchw = str(a.data_layout) == "NCHW" and str(a.out_layout) in ("NCHW", "")
        if nchw and static_shape(x)[1] == w.shape[1] * groups:  # its type, as inferred
            shape = list(static_shape(var))
            shape[1] = hi - lo
            conv = typed(conv, relax.TensorType(shape, var.ty.dtype))
        return conv

    def _grouped_conv(self, var, call, name):
        """A grouped conv on channel slices that fall on group boundaries stays local."""
        if name != "nn.conv2d" or int(call.attrs.groups) == 1 or not splittable(call):
            return None
        st = self.state.get(call.args[0])
        if not isinstance(st, _Split) or st.axis != 1:
            return None
        w = const_array(call.args[1])
        groups = int(call.attrs.groups)
        in_per_group, out_per_group = w.shape[1], w.shape[0] // groups
        if any(lo % in_per_group or hi % in_per_group for lo, hi in st.bounds):
            return None
        bounds = tuple((lo // in_per_group * out_per_group, hi // in_per_group * out_per_group)
                       for lo, hi in st.bounds)
        parts = tuple(
            self.emit(self._conv_slice(var, call, x, w, lo, hi),
                      f"{var.name}_c{k}", k)
            for k, ((lo, hi), x) in enumerate(zip(bounds, st.parts, strict=True)))
        return _Split(1, bounds, parts)

    def _elementwise(self, var, call, name):
        if name in UNARY_ELEMENTWISE or name in PER_CHANNEL_NCHW:
            st = self.state.get(call.args[0])
            if not isinstance(st, _Split) or (name in PER_CHANNEL_NCHW and st.axis != 1):
                return None
            parts = tuple(
                self.emit(relax.Call(call.op, [x, *call.args[1:]], call.attrs, call.ty_args),
                          f"{var.name}_c{k}", k) for k, x in enumerate(st.parts))
            return _Split(st.axis, st.bounds, parts)
        if name not in BINARY_ELEMENTWISE:
            return None
        splits = [self.state[a] for a in call.args
                  if isinstance(a, relax.Var) and isinstance(self.state.get(a), _Split)]
        if not splits or any((s.axis, s.bounds) != (splits[0].axis, splits[0].bounds)
                             for s in splits):
            return None
        ref = splits[0]
        out_rank = len(static_shape(var))
        parts = []
        for k, (lo, hi) in enumerate(ref.bounds):
            args = []
            for a in call.args:
                arg = self._operand_slice(a, ref.axis, out_rank, k, lo, hi)
                if arg is None:
                    return None
                args.append(arg)
            parts.append((args, k))
        emitted = tuple(self.emit(relax.Call(call.op, args, call.attrs, call.ty_args),
                                  f"{var.name}_c{k}", k) for args, k in parts)
        return _Split(ref.axis, ref.bounds, emitted)

    def _operand_slice(self, arg, axis, out_rank, k, lo, hi):
        """Operand ``arg`` of a binary op, restricted to channels ``lo:hi`` for device ``k``."""
        st = self.state.get(arg) if isinstance(arg, relax.Var) else None
        if isinstance(st, _Split):
            return st.parts[k]
        shape = static_shape(arg)
        a = axis - (out_rank - len(shape))
        if a < 0 or shape[a] == 1:
            return self.full_on(arg, k) if st is not None else arg
        if isinstance(arg, tvm.ir.GenericConst):
            return relax.const(np.take(const_array(arg), range(lo, hi), axis=a))
        return None

    def _reduction(self, var, call, name):
        if name not in REDUCTIONS:
            return None
        st = self.state.get(call.args[0])
        if not isinstance(st, _Split) or call.attrs.axis is None:
            return None
        rank = len(static_shape(call.args[0]))
        axes = [int(x) % rank for x in call.attrs.axis]
        if st.axis in axes:
            return None
        new_axis = st.axis if call.attrs.keepdims else st.axis - sum(x < st.axis for x in axes)
        parts = tuple(
            self.emit(relax.Call(call.op, [x], call.attrs, call.ty_args), f"{var.name}_c{k}", k)
            for k, x in enumerate(st.parts))
        return _Split(new_axis, st.bounds, parts)

    # -- the whole function ------------------------------------------------------------------
    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        func = mod["main"]
        block = main_block(mod)
        params = [relax.Var(p.name, p.ty) for p in func.params]
        attrs = dict(func.attrs.items()) if func.attrs else {}
        outputs = output_vars(func)
        with self.bb.function("main", params, attrs=attrs):
            for p, new in zip(func.params, params, strict=True):
                self.state[p] = _Full(new, None)
            with self.bb.dataflow():
                for b in block.bindings:
                    self.rewrite(b)
                results = []
                for v in outputs:
                    device = self.home.get(v.name, 0)
                    full = self.full_on(v, device)
                    out = self.bb.emit_output(full, name_hint=f"{v.name}_out")
                    self.device_of[out.name] = device
                    results.append(out)
            self.bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
        return copy_helpers(mod, self.bb.get())


@tvm.transform.module_pass(opt_level=0, name="splitc.ChannelSplit")
class ChannelSplit:
    """Apply a :class:`ChannelPlan`: split the named layers' output channels across devices.

    Parameters
    ----------
    plan : ChannelPlan
        The layers to split and the number of devices.
    """

    def __init__(self, plan: ChannelPlan):
        if plan.n_devices < 1:
            raise SplitcError("a channel split needs at least one device")
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = ChannelRewriter(self.plan)
        flat = rewriter.run(mod)
        return OutlinePieces(rewriter.device_of)(flat)
