"""Relax clean-up after import: batch norms folded, bindings canonicalised, constants folded,
and every tensor of ``main`` checked static (the form :mod:`splitc.passes` expect)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError, short_message
from splitc.passes.ir import copy_helpers, main_block, output_vars, substitute

#: ``call_tir`` callees that TVM's ONNX ``Clip`` converter emits (``topi.maximum/minimum``).
_CLIP_PRIMFUNC_RE = re.compile(r"^(maximum|minimum)\d*$")


def _const_value(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a Relax constant, else None."""
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    return None


def _static_ty_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and _is_static(ty):
        return tuple(int(d) for d in ty.shape.values)
    return None


#: Relax ops on constants that :func:`_fold_in_numpy` evaluates with numpy.
_NUMPY_BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply,
                 "divide": np.divide, "maximum": np.maximum, "minimum": np.minimum,
                 "less": np.less, "greater": np.greater, "equal": np.equal,
                 "less_equal": np.less_equal, "greater_equal": np.greater_equal}


def _fold_in_numpy(call: relax.Call, args: Sequence[relax.Expr]) -> relax.Expr | None:
    """Evaluate a cheap op on constants with numpy (``FoldConstant`` would compile a kernel
    for it, ~10 ms each), or None. ``args`` are the call's arguments with variables bound to
    constants already resolved."""
    name = getattr(call.op, "name", "")
    shape = _static_ty_shape(call)
    if shape is None or not name.startswith("relax."):
        return None
    op, attrs = name[len("relax."):], call.attrs
    if op == "shape_to_tensor":
        dims = getattr(args[0].ty, "values", None)
        if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
            return None
        return relax.const(np.array([int(d) for d in dims], dtype="int64"), "int64")
    try:
        out = _numpy_op(op, attrs, args, shape)
    except Exception:  # anything unexpected: leave it to FoldConstant
        return None
    dtype = str(call.ty.dtype)
    if out is None or tuple(out.shape) != shape:
        return None
    return relax.const(np.array(out, dtype=dtype, order="C"), dtype)


def _numpy_op(op: str, attrs, args: Sequence[relax.Expr], shape: tuple[int, ...]
              ) -> np.ndarray | None:
    """``op`` evaluated with numpy when its tensor arguments are all constants, else None
    (``shape`` is the call's static result shape)."""
    tensor_args = [a for a in args if not isinstance(a, relax.ShapeExpr)]
    values = [_const_value(a) for a in tensor_args]
    if not values or any(v is None for v in values):
        return None
    x = values[0]
    if op in _NUMPY_BINARY and len(values) == 2:
        if op == "divide" and not np.issubdtype(x.dtype, np.floating):
            return None  # integer division rounding differs between numpy and TVM
        out = _NUMPY_BINARY[op](values[0], values[1])
    elif op == "take":
        axis = None if attrs.axis is None else int(attrs.axis)
        out = np.take(x, values[1], axis=axis, mode="wrap" if attrs.mode == "wrap" else "raise")
    elif op == "reshape":
        out = x.reshape(shape)
    elif op == "permute_dims":
        out = np.transpose(x, None if attrs.axes is None else [int(a) for a in attrs.axes])
    elif op == "isnan":
        out = np.isnan(x)
    elif op == "where" and len(values) == 3:
        out = np.where(*values)
    elif op == "astype":
        out = x.astype(str(attrs.dtype))
    elif op == "expand_dims":
        out = np.expand_dims(x, tuple(int(a) for a in attrs.axis))
    elif op == "squeeze":
        out = np.squeeze(x, None if attrs.axis is None else tuple(int(a) for a in attrs.axis))
    else:
        return None
    return np.asarray(out)


@relax.expr_functor.mutator
class _Canonicalise(relax.PyExprMutator):
    """Cheap clean-ups after import.

    * Layout ops on constants (weight reshapes/transposes, Clip's NaN guards) are folded with
      numpy: ``FoldConstant`` compiles one kernel per such op (~10 ms each).
    * ``R.call_tir(maximum, (x, c))`` / ``minimum`` with a scalar constant ``c`` (how TVM's ONNX
      importer lowers ``Clip``, e.g. MobileNet's ReLU6) become ``R.maximum`` / ``R.minimum``,
      and ``minimum(maximum(x, lo), hi)`` becomes ``R.clip(x, lo, hi)``: plain Relax ops that
      the split passes understand.
    """

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        folded = _fold_in_numpy(call, [self._resolve(a) for a in call.args])
        if folded is not None:
            return folded
        clipped = self._clip_call(call)
        return call if clipped is None else clipped

    def _resolve(self, expr: relax.Expr) -> relax.Expr:
        """A variable bound to a constant → the constant (else ``expr``)."""
        if isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if isinstance(value, tvm.ir.GenericConst):
                return value
        return expr

    def _clip_call(self, call: relax.Call) -> relax.Expr | None:
        if getattr(call.op, "name", "") != "relax.call_tir":
            return None
        callee, args = call.args[0], call.args[1]
        match = _CLIP_PRIMFUNC_RE.match(getattr(callee, "name_hint", ""))
        if not match or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return None
        x, bound = args.fields
        bound = self._resolve(bound)
        value = _const_value(bound)
        if value is None or value.ndim != 0 or _static_ty_shape(x) != _static_ty_shape(call):
            return None
        if match.group(1) == "maximum":
            return relax.op.maximum(x, bound)
        inner = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if isinstance(inner, relax.Call) and getattr(inner.op, "name", "") == "relax.maximum":
            low = _const_value(self._resolve(inner.args[1]))
            if low is not None and low.ndim == 0:
                return relax.op.clip(inner.args[0], float(low), float(value))
        return relax.op.minimum(x, bound)


def canonicalise(mod: tvm.IRModule) -> tvm.IRModule:
    """Apply :class:`_Canonicalise` to ``main`` and drop what became dead."""
    rewriter = _Canonicalise(mod)
    func = rewriter.visit_expr(mod["main"])
    rewriter.builder_.update_func(mod.get_global_var("main"), func)
    mod = rewriter.builder_.get()
    return relax.transform.DeadCodeElimination(["main"])(mod)


def finish_relax(mod: tvm.IRModule, label: str) -> tvm.IRModule:
    """Fold batch norms, canonicalise, ``FoldConstant``, then insist that every tensor in
    ``main`` is static."""
    try:
        # Batch norm after a convolution folds into its weights and a bias; any other
        # becomes per-channel subtract/multiply/add on constants.
        mod = relax.transform.FoldBatchnormToConv2D()(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.FoldConstant()(canonicalise(mod))
        # Decomposed batch norm leaves (y, mean, var)[0]: bind y itself, so the layout and
        # split passes see the op that made it.
        mod = relax.transform.DeadCodeElimination(["main"])(
            relax.transform.CanonicalizeBindings()(mod))
    except Exception as e:
        raise SplitcError(f"TVM could not fold constants of {label}: {type(e).__name__}: "
                          f"{short_message(e)}") from e
    dynamic = dynamic_bindings(mod["main"])
    if dynamic:
        shown = "; ".join(f"{name}: {ty}" for name, ty in dynamic[:3])
        raise SplitcError(f"{label}: after import, {len(dynamic)} tensor(s) still have dynamic "
                          f"shapes ({shown}); splitc needs static shapes (pin the inputs, or "
                          "the model computes a data-dependent shape)")
    return unique_names(mod)


def unique_names(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every parameter and binding of ``main`` named differently.

    TVM's importers and passes may give two bindings the same name (a torch import repeats
    ``lv5``...); the split passes and the plan name tensors by their variables' names, so a
    repeat would make two tensors one. A repeated name gets the first free ``_<n>`` suffix."""
    func = mod["main"]
    bindings = list(main_block(mod).bindings)
    names = [p.name for p in func.params] + [b.var.name for b in bindings]
    if len(set(names)) == len(names):
        return mod
    taken = set(names)
    seen = {p.name for p in func.params}
    outputs = set(output_vars(func))
    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, p.ty) for p in func.params]
    vmap: dict[relax.Var, relax.Expr] = dict(zip(func.params, params, strict=True))
    with bb.function("main", params, attrs=dict(func.attrs.items()) if func.attrs else {}):
        with bb.dataflow():
            for b in bindings:
                name, i = b.var.name, 0
                while name in seen or (i and name in taken):  # (taken: a later original)
                    i += 1
                    name = f"{b.var.name}_{i}"
                seen.add(name)
                taken.add(name)
                emit = bb.emit_output if b.var in outputs else bb.emit
                vmap[b.var] = emit(substitute(b.value, vmap), name_hint=name)
        results = [vmap[v] for v in output_vars(func)]
        bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
    return copy_helpers(mod, bb.get())


def _is_static(ty) -> bool:
    if isinstance(ty, relax.TensorType):
        return ty.shape is not None and all(isinstance(d, tvm.tirx.IntImm)
                                            for d in ty.shape.values)
    if isinstance(ty, relax.TupleType):
        return all(_is_static(f) for f in ty.fields)
    return True  # shapes, objects, prims: not tensors


def dynamic_bindings(func: relax.Function) -> list[tuple[str, str]]:
    """(name, type) of the params and bindings of ``func`` whose tensor shapes are not static.
    """
    found = [(p.name, str(p.ty)) for p in func.params if not _is_static(p.ty)]
    body = func.body
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            if not _is_static(binding.var.ty):
                found.append((binding.var.name, str(binding.var.ty)))
    if not _is_static(func.ret_ty):
        found.append(("return", str(func.ret_ty)))
    return found
