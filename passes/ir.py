"""Small facts about Relax IR that every splitc pass needs, kept in one place.

splitc's passes work on the *imported form* of a model: an IRModule whose ``main`` holds one
dataflow block of operator calls, with weights bound as constants (what the ONNX and torch
importers produce after ``FoldConstant``). :func:`main_block` checks that precondition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr import _update_type  # (the FFI's UpdateType: no public name in 0.27)

from splitc.errors import SplitcError

# keep the type when raised inside a TVM pass (errors cross TVM's FFI by registered name);
# registered here, with the passes, so that the CLI's board path (`splitc serve`) never
# imports tvm_ffi, which imports torch
tvm_ffi.register_error(SplitcError)

#: Function attribute naming the device a piece runs on (set by :mod:`splitc.passes.split.outline`).
DEVICE_ATTR = "splitc.device"
#: The device index of the caller. A split may put only slices of model inputs there
#: (``strided_slice`` of a parameter of ``main``): the client cuts them and sends each device
#: the part it reads instead of the whole input (see :func:`splitc.planning.extract.extract`).
CLIENT = -1


@dataclass(frozen=True)
class TensorRef:
    """A tensor that can cross a device boundary: its name, static shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * tvm.DataType(self.dtype).bits // 8

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes}


@functools.lru_cache(maxsize=1 << 16)
def static_shape(expr: relax.Expr) -> tuple[int, ...]:
    """Static shape of a tensor-typed expression; a dynamic dim is a user-facing error.

    Remembered per expression (IR nodes are immutable, and equal only to themselves): the
    spatial planner asks for the same shapes hundreds of thousands of times, and reading
    one through the FFI costs ~13 us."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise SplitcError(f"expected a tensor with a known shape, got {ty}")
    dims = []
    for d in ty.shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            raise SplitcError(f"tensor has a dynamic dimension {d}: pin input shapes "
                              "(--input-shape NAME=1,3,224,224)")
        dims.append(int(d))
    return tuple(dims)


def tensor_ref(var: relax.Var) -> TensorRef:
    return TensorRef(var.name, static_shape(var), str(var.ty.dtype))


def is_tensor(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def main_block(mod: tvm.IRModule) -> relax.DataflowBlock:
    """The single dataflow block of ``main``, or a :class:`SplitcError` naming what differs."""
    func = mod["main"]
    body = func.body
    blocks = [b for b in body.blocks if len(b.bindings)]
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        raise SplitcError("splitc expects main to hold exactly one dataflow block "
                          f"(found {len(blocks)} non-empty blocks)")
    return blocks[0]


def op_name(expr: relax.Expr) -> str:
    """``"nn.conv2d"`` for a call to ``relax.nn.conv2d``; the expression kind otherwise."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name.removeprefix("relax.")
    return type(expr).__name__


def var_inputs(expr: relax.Expr) -> list[relax.Var]:
    """The variables an expression reads, in argument order, without repeats."""
    return list(_var_inputs(expr))


@functools.lru_cache(maxsize=1 << 16)  # (remembered as static_shape is, and for the same use)
def _var_inputs(expr: relax.Expr) -> tuple[relax.Var, ...]:
    seen: dict[relax.Var, None] = {}

    def walk(e):
        if isinstance(e, relax.Var):
            seen.setdefault(e)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                walk(f)
        elif isinstance(e, relax.TupleGetItem):
            walk(e.tuple_value)
        elif isinstance(e, relax.Call):
            for a in e.args:
                walk(a)

    walk(expr)
    return tuple(seen)


def substitute(expr: relax.Expr, vmap: Mapping[relax.Var, relax.Expr]) -> relax.Expr:
    """``expr`` with the variables in ``vmap`` replaced (operator calls, tuples, projections)."""
    if isinstance(expr, relax.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, vmap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, vmap), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, vmap) for a in expr.args], expr.attrs,
                          expr.ty_args)
    return expr


def typed(expr: relax.Expr, ty: relax.Type) -> relax.Expr:
    """``expr`` (a new call) told its type, so that the block builder does not infer it:
    TVM 0.27 infers a convolution's or a pooling's in 0.4-0.65 ms (it parses their layouts
    each time), and splitting ResNet-50 eight ways emits thousands of them (5 of the 14 s
    ``--strategy auto`` took). Only for a type known exactly: the binding's it re-emits with
    arguments of the same types, or that binding's with the rows of a tile."""
    _update_type(expr, ty)
    return expr


def rebound(expr: relax.Expr, vmap: Mapping[relax.Var, relax.Expr], ty: relax.Type
            ) -> relax.Expr:
    """A binding's value ``expr`` with its variables replaced by others of the same types
    (:func:`substitute`): a call keeps the binding's type ``ty``, told rather than inferred
    (:func:`typed`)."""
    new = substitute(expr, vmap)
    if isinstance(new, relax.Call) and isinstance(ty, relax.TensorType):
        new = typed(new, ty)
    return new


def constants(expr: relax.Expr) -> list[tvm.ir.GenericConst]:
    """The tensor constants (weights) an expression reads directly.

    ``tvm.ir.GenericConst`` is the tensor constant; ``tvm.ir.Constant`` also covers the
    integer immediates inside shapes, which are not weights.
    """
    out = []

    def walk(e):
        if isinstance(e, tvm.ir.GenericConst):
            out.append(e)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                walk(f)
        elif isinstance(e, relax.Call):
            for a in e.args:
                walk(a)

    walk(expr)
    return out


def const_array(c: tvm.ir.GenericConst) -> np.ndarray:
    return c.value.numpy()


def const_nbytes(c: tvm.ir.GenericConst) -> int:
    return math.prod(static_shape(c)) * tvm.DataType(str(c.ty.dtype)).bits // 8


def users(bindings: Iterable[relax.VarBinding]) -> dict[relax.Var, list[relax.VarBinding]]:
    """For each variable, the bindings that read it."""
    out: dict[relax.Var, list[relax.VarBinding]] = {}
    for b in bindings:
        for v in var_inputs(b.value):
            out.setdefault(v, []).append(b)
    return out


def output_vars(func: relax.Function) -> list[relax.Var]:
    """The variables ``main`` returns (one, or the fields of a returned tuple)."""
    body = func.body.body
    if isinstance(body, relax.Tuple):
        return [f for f in body.fields if isinstance(f, relax.Var)]
    return [body] if isinstance(body, relax.Var) else []


def copy_helpers(old: tvm.IRModule, new: tvm.IRModule) -> tvm.IRModule:
    """``new`` plus the functions of ``old`` other than ``main`` that ``new`` lacks.

    Importers may add kernels to the module (``call_tir`` targets); a pass that rebuilds
    ``main`` with a fresh block builder keeps them with this.
    """
    names = {gv.name_hint for gv in new.get_global_vars()}
    for gv, func in old.functions.items():
        if gv.name_hint != "main" and gv.name_hint not in names:
            new[gv] = func
    return new


def rebuild_main(mod: tvm.IRModule, rewrite) -> tvm.IRModule:
    """``mod`` with ``main`` rebuilt binding by binding: ``rewrite(binding, vmap)`` returns
    each binding's new value, ``vmap`` mapping the old variables to the new ones (apply it
    with :func:`substitute`). Outputs, parameters, attributes and helpers are kept."""
    func = mod["main"]
    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, p.ty) for p in func.params]
    vmap: dict[relax.Var, relax.Expr] = dict(zip(func.params, params, strict=True))
    outputs = {v.name for v in output_vars(func)}
    with bb.function("main", params, attrs=dict(func.attrs.items()) if func.attrs else {}):
        with bb.dataflow():
            for b in main_block(mod).bindings:
                emit = bb.emit_output if b.var.name in outputs else bb.emit
                vmap[b.var] = emit(rewrite(b, vmap), name_hint=b.var.name)
        results = [vmap[v] for v in output_vars(func)]
        bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
    return copy_helpers(mod, bb.get())


def rewrite_bindings(mod: tvm.IRModule, plans: Mapping[tvm.ir.GlobalVar, Mapping],
                     rewrite) -> tvm.IRModule:
    """Apply a per-binding plan: for each function ``gv`` of ``mod`` and each binding whose
    variable ``plans[gv]`` holds, ``rewrite(builder, call, args, plan_value)`` returns the
    new value (emitting what it needs first; ``args`` are the call's arguments, already
    rewritten). Other bindings are kept. Returns ``mod`` itself when no plan holds anything."""
    if not any(plans.values()):
        return mod

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, module, plan):
            super().__init__(module)
            self.plan = plan

        def visit_var_binding_(self, binding):
            if binding.var not in self.plan:
                return super().visit_var_binding_(binding)
            call = binding.value
            args = [self.visit_expr(arg) for arg in call.args]
            value = rewrite(self.builder_, call, args, self.plan[binding.var])
            emit = (self.builder_.emit if isinstance(binding.var, relax.DataflowVar)
                    else self.builder_.emit_output)
            self.set_var_remap(binding.var, emit(value, name_hint=binding.var.name))

    out = mod
    for gv, plan in plans.items():
        if plan:
            mutator = _Rewrite(out, plan)
            mutator.builder_.update_func(gv, mutator.visit_expr(out[gv]))
            out = mutator.builder_.get()
    return out


def plain_conv2d(call: relax.Expr) -> tuple[int, int, int] | None:
    """``(c_in, c_out, c_in per group)`` of a float32 ``NCHW`` / ``OIHW`` 2-D convolution with
    static shapes, the form the CPU rewrites start from; None for anything else."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.nn.conv2d")):
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if str(call.args[0].ty.dtype) != "float32" or str(call.args[1].ty.dtype) != "float32":
        return None
    if str(a.out_dtype) not in ("", "void", "None", "float32"):
        return None
    try:
        _, c_in, _, _ = static_shape(call.args[0])
        c_out, per_group, _, _ = static_shape(call.args[1])
    except SplitcError:  # dynamic shapes: leave the convolution alone
        return None
    return c_in, c_out, per_group


@relax.expr_functor.mutator
class _LiftConstants(relax.PyExprMutator):
    """Replace every constant of a function body by a new parameter, collecting the arrays."""

    def __init__(self):
        super().__init__()
        self.params: list[relax.Var] = []
        self.consts: list[tvm.ir.GenericConst] = []

    def visit_generic_const_(self, const):
        var = relax.Var(f"w{len(self.params)}", const.ty)
        self.params.append(var)
        self.consts.append(const)
        return var

    def visit_call_(self, call):
        # (built here, typed: the default mutator has each call's type inferred again)
        args = [self.visit_expr(a) for a in call.args]
        if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
            return call
        return typed(relax.Call(call.op, args, call.attrs, call.ty_args), call.ty)


def lift_constants(func: relax.Function
                   ) -> tuple[relax.Function, list[tvm.ir.GenericConst]]:
    """``func`` with its constants turned into trailing parameters (``num_input`` says how
    many parameters come before them), and the constants as TVM holds them."""
    lifter = _LiftConstants()
    body = lifter.visit_expr(func.body)
    params = list(func.params) + lifter.params
    attrs = dict(func.attrs.items()) if func.attrs else {}
    attrs["num_input"] = len(func.params)
    new = relax.Function(params, body, func.ret_ty, func.is_pure).with_attrs(attrs)
    return new, lifter.consts


def lift_weights(func: relax.Function) -> tuple[relax.Function, list[np.ndarray]]:
    """``func`` with its constants turned into trailing parameters, and their values."""
    new, consts = lift_constants(func)
    return new, [const_array(c) for c in consts]
