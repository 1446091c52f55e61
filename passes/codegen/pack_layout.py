"""PackConvLayout: run convolutions on channel-packed tensors (``NCHW[x]c``).

A CPU convolution is fast when the innermost loop runs over a block of output channels that
fills a vector register: each input value is broadcast once and multiplied into a whole
register of weights. That needs the channels packed innermost: activations ``NCHW8c``
(``[n, c // 8, h, w, c % 8]``) and weights ``OIHW8i8o``. This pass rewrites every 2-D
convolution it can pack into that form and keeps the result packed through the ops that do
not care about the channel order (element-wise ops, per-channel bias adds and batch-norm
arithmetic, max and average pooling, channel concatenation of whole blocks, the next
convolution), so layouts change only where the packed run ends. Weight layout changes
are ``R.layout_transform`` of parameters: :func:`splitc.backend.build.build` lifts them out and
applies them once at compile time.

The analysis (:func:`plan_packing`) picks a block per convolution: the largest divisor of
the channel count not above the target's vector lanes (for a grouped convolution, of the
channels per group, so a block lies in one group); the rewrite only applies that plan.
Convolutions the plan leaves out (non-float32, other layouts, blocks of 1) stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax

from splitc.passes.ir import plain_conv2d, static_shape, substitute, var_inputs

#: Ops that keep a packed tensor packed: elementwise on one tensor.
_UNARY = {"relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.nn.silu", "relax.tanh",
          "relax.nn.gelu"}
#: Elementwise ops on two tensors of the same layout, or a tensor and a per-channel vector.
_BINARY = {"relax.add", "relax.multiply", "relax.subtract", "relax.divide", "relax.maximum",
           "relax.minimum"}


@dataclass(frozen=True)
class ConvPacking:
    """How one convolution runs packed: channels per block in, and out."""

    in_block: int
    out_block: int
    depthwise: bool = False

    @property
    def kernel_in_block(self) -> int:
        """Input channels per kernel block: a depthwise kernel has one input channel."""
        return 1 if self.depthwise else self.in_block

    @property
    def kernel_layout(self) -> str:
        return f"OIHW{self.kernel_in_block}i{self.out_block}o"


def channel_block(channels: int, lanes: int) -> int:
    """The largest divisor of ``channels`` that is at most ``lanes``."""
    return max(d for d in range(1, min(channels, lanes) + 1) if channels % d == 0)


def packed_layout(block: int) -> str:
    return f"NCHW{block}c"


def plan_packing(func: relax.Function, lanes: int) -> dict[relax.Var, ConvPacking]:
    """The convolutions of ``func`` to pack, by the variable they bind."""
    plan: dict[relax.Var, ConvPacking] = {}
    if not isinstance(func.body, relax.SeqExpr):
        return plan
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            conv = plain_conv2d(call)
            if conv is None:
                continue
            c_in, c_out, c_in_per_group = conv
            a = call.attrs
            groups = int(a.groups)
            if groups == 1:
                packing = ConvPacking(channel_block(c_in, lanes), channel_block(c_out, lanes))
            elif groups == c_in == c_out and c_in_per_group == 1:
                b = channel_block(c_out, lanes)
                packing = ConvPacking(b, b, depthwise=True)
            else:  # grouped (ResNeXt): a block never straddles two groups
                b = channel_block(math.gcd(c_in_per_group, c_out // groups), lanes)
                packing = ConvPacking(b, b)
            if packing.out_block > 1:
                plan[binding.var] = packing
    return plan


def _pack_map(block: int):
    return lambda n, c, h, w: (n, c // block, h, w, c % block)


def _unpack_map(block: int):
    return lambda n, c, h, w, b: (n, c * block + b, h, w)


@tvm.transform.module_pass(opt_level=0, name="PackConvLayout")
class PackConvLayout:
    """Run convolutions packed ``NCHW[x]c`` and keep tensors packed between them.

    Parameters
    ----------
    lanes : int
        fp32 lanes of the target's vector registers (8 for AVX2, 4 for NEON): the block size
        the pass aims for.
    """

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            plan = plan_packing(func, self.lanes)
            new = _Rewriter(plan).rewrite(func) if plan else None
            if new is not None:
                updates[gv] = new
        if not updates:
            return mod
        out = mod.clone()
        for gv, func in updates.items():
            out.update_func(gv, func)
        return out


class _Rewriter:
    """Applies a packing plan to one function with a single dataflow block."""

    def __init__(self, plan: dict[relax.Var, ConvPacking]):
        self.plan = plan
        self.bb = relax.BlockBuilder()
        self.plain: dict[relax.Var, relax.Expr] = {}   # original var -> NCHW value
        self.packed: dict[relax.Var, tuple[relax.Expr, int]] = {}  # -> (packed value, block)

    def rewrite(self, func: relax.Function) -> relax.Function | None:
        body = func.body
        blocks = [b for b in body.blocks if len(b.bindings)]
        if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
            return None
        bb = self.bb
        name = "f"
        attrs = dict(func.attrs.items()) if func.attrs else {}
        with bb.function(name, list(func.params), attrs=attrs, pure=func.is_pure, private=True):
            with bb.dataflow():
                for binding in blocks[0].bindings:
                    self._binding(binding)
                result = substitute(body.body, self._plain_map(body.body))
                if not (isinstance(result, relax.Var)
                        and not isinstance(result, relax.DataflowVar)):
                    result = bb.emit_output(result)
            bb.emit_func_output(result)
        new = bb.get()[name]
        return relax.Function(new.params, new.body, new.ret_ty, new.is_pure, func.attrs)

    # -- values in either layout ---------------------------------------------------------------
    def _plain_of(self, var: relax.Var) -> relax.Expr:
        if var in self.plain:
            return self.plain[var]
        if var in self.packed:
            value, block = self.packed[var]
            plain = self.bb.emit(relax.op.layout_transform(value, _unpack_map(block)))
            self.plain[var] = plain
            return plain
        return var  # a parameter, or a value this pass never touched

    def _plain_map(self, expr: relax.Expr) -> dict[relax.Var, relax.Expr]:
        return {v: self._plain_of(v) for v in var_inputs(expr)}

    def _packed_of(self, expr: relax.Expr, block: int) -> relax.Expr:
        if isinstance(expr, relax.Var) and expr in self.packed:
            value, have = self.packed[expr]
            if have == block:
                return value
        plain = self._plain_of(expr) if isinstance(expr, relax.Var) else expr
        return self.bb.emit(relax.op.layout_transform(plain, _pack_map(block)))

    def _packed_block(self, expr: relax.Expr) -> int | None:
        if isinstance(expr, relax.Var) and expr in self.packed:
            return self.packed[expr][1]
        return None

    # -- one binding -------------------------------------------------------------------------
    def _binding(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        packed = self._packed_value(var, value)
        if packed is None:
            new_value = substitute(value, self._plain_map(value))
            emit = self.bb.emit if isinstance(var, relax.DataflowVar) else self.bb.emit_output
            self.plain[var] = emit(new_value, name_hint=var.name)
            return
        new_value, block = packed
        self.packed[var] = (self.bb.emit(new_value, name_hint=var.name), block)
        if not isinstance(var, relax.DataflowVar):  # a block output leaves in NCHW
            self.plain[var] = self.bb.emit_output(
                relax.op.layout_transform(self.packed[var][0], _unpack_map(block)),
                name_hint=var.name)

    def _packed_value(self, var: relax.Var, value: relax.Expr):
        """The packed form of ``value`` and its block, or None if it stays NCHW."""
        if var in self.plan:
            p = self.plan[var]
            a = value.attrs
            data = self._packed_of(value.args[0], p.in_block)
            kernel = value.args[1]  # a weight, or a value computed from one (MergeGroups)
            kernel = self._plain_of(kernel) if isinstance(kernel, relax.Var) else kernel
            weight = self.bb.emit(relax.op.layout_transform(kernel, _kernel_map(p)))
            conv = relax.op.nn.conv2d(
                data, weight, strides=a.strides, padding=a.padding, dilation=a.dilation,
                groups=a.groups, data_layout=packed_layout(p.in_block),
                kernel_layout=p.kernel_layout, out_layout=packed_layout(p.out_block))
            return conv, p.out_block
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        op = value.op.name
        if op in _UNARY:
            block = self._packed_block(value.args[0])
            if block is None:
                return None
            return relax.Call(value.op, [self.packed[value.args[0]][0], *value.args[1:]],
                              value.attrs, value.ty_args), block
        if op in _BINARY:
            return self._binary(value)
        if op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d") \
                and (value.attrs.layout, value.attrs.out_layout) == ("NCHW", "NCHW"):
            block = self._packed_block(value.args[0])
            if block is None:
                return None
            a = value.attrs
            pool = getattr(relax.op.nn, op.removeprefix("relax.nn."))(
                self.packed[value.args[0]][0], pool_size=a.pool_size, strides=a.strides,
                padding=a.padding, dilation=a.dilation, ceil_mode=a.ceil_mode,
                count_include_pad=a.count_include_pad, layout=packed_layout(block),
                out_layout=packed_layout(block))
            return pool, block
        if op == "relax.concat":
            return self._concat(value)
        return None

    def _concat(self, value: relax.Call):
        """Channel concatenation of packed tensors stays packed when every part's channels
        are whole blocks."""
        fields = value.args[0]
        if not isinstance(fields, relax.Tuple) or int(value.attrs.axis) not in (1, -3):
            return None
        known = [b for b in map(self._packed_block, fields.fields) if b is not None]
        if not known or any(_rank(f) != 4 or static_shape(f)[1] % known[0] for f in fields):
            return None
        parts = [self._packed_of(f, known[0]) for f in fields.fields]
        return relax.op.concat(parts, axis=1), known[0]

    def _binary(self, value: relax.Call):
        lhs, rhs = value.args
        known = [b for b in (self._packed_block(lhs), self._packed_block(rhs)) if b is not None]
        if not known or not _packable_operands(value, lhs, rhs):
            return None
        block = known[0]
        args = []
        for e in (lhs, rhs):
            if _rank(e) == 3:  # a per-channel vector (C, 1, 1): make it (1, C, 1, 1)
                e = self.bb.emit(relax.op.expand_dims(e, 0))
            args.append(self._packed_of(e, block))
        return relax.Call(value.op, args, value.attrs, value.ty_args), block


def _kernel_map(p: ConvPacking):
    ib, ob = p.kernel_in_block, p.out_block
    return lambda o, i, h, w: (o // ob, i // ib, h, w, i % ib, o % ob)


def _rank(expr: relax.Expr) -> int:
    ty = expr.ty
    return ty.ndim if isinstance(ty, relax.TensorType) else -1


def _packable_operands(value: relax.Call, lhs: relax.Expr, rhs: relax.Expr) -> bool:
    """Both operands are the result's 4-D shape, or a per-channel vector of its channels."""
    try:
        out = static_shape(value)
        shapes = [static_shape(e) for e in (lhs, rhs)]
    except Exception:
        return False
    if len(out) != 4:
        return False
    per_channel = {(1, out[1], 1, 1), (out[1], 1, 1)}
    return all(s == out or s in per_channel for s in shapes)
