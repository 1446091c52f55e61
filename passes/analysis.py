"""Analysis: what each binding of ``main`` costs, and what crosses each place it can be cut.

Nothing here rewrites; the split passes and the planner read these values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax

from splitc.passes.codegen.winograd import stored_weight_factor
from splitc.passes.ir import (
    TensorRef,
    const_nbytes,
    constants,
    is_tensor,
    main_block,
    op_name,
    output_vars,
    static_shape,
    tensor_ref,
    var_inputs,
)


@dataclass(frozen=True)
class BindingCost:
    """Cost of one binding of ``main``.

    ``flops`` counts a multiply-add as two; elementwise and data-movement ops count one per
    output element (they matter only as a tie-breaker next to convolutions and matmuls).
    """

    index: int
    name: str
    op: str
    flops: int
    weight_bytes: int
    out: TensorRef | None

    @property
    def out_bytes(self) -> int:
        return self.out.nbytes if self.out else 0


@dataclass(frozen=True)
class Cut:
    """The place after binding ``index``: the tensors computed before it and read after it."""

    index: int
    crossing: tuple[TensorRef, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.crossing)


def op_flops(call: relax.Expr, out_shape: tuple[int, ...]) -> int:
    """FLOPs of one operator call whose output has ``out_shape``."""
    out_elems = math.prod(out_shape) if out_shape else 1
    name = op_name(call)
    if name in ("nn.conv1d", "nn.conv2d"):
        w = static_shape(call.args[1])  # O, I/groups, kernel...
        return 2 * out_elems * math.prod(w[1:])
    if name == "nn.conv2d_transpose":
        w = static_shape(call.args[1])  # I, O/groups, kernel...
        return 2 * math.prod(static_shape(call.args[0])) * math.prod(w[1:])
    if name in ("matmul", "nn.dense", "linear"):
        k = static_shape(call.args[0])[-1]
        return 2 * out_elems * k
    if name in ("nn.max_pool2d", "nn.avg_pool2d"):
        return out_elems * math.prod(int(p) for p in call.attrs.pool_size)
    if name in ("mean", "sum", "max", "min", "nn.adaptive_avg_pool2d", "nn.softmax",
                "nn.layer_norm", "nn.batch_norm"):
        return math.prod(static_shape(call.args[0]))
    return out_elems


def function_flops(func: relax.Function) -> int:
    """FLOPs of every tensor-valued binding in ``func`` (a piece, or ``main``)."""
    total = 0
    for block in func.body.blocks:
        for b in block.bindings:
            if is_tensor(b.var) and isinstance(b.value, relax.Call):
                total += op_flops(b.value, static_shape(b.var))
    return total


def weight_bytes(call: relax.Expr) -> int:
    """Bytes of the constants ``call`` reads, as a CPU build stores them."""
    return sum(const_nbytes(c) for c in constants(call)) + winograd_extra_bytes(call)


def winograd_extra_bytes(call: relax.Expr) -> int:
    """What a convolution run as Winograd stores beyond its kernel: the transformed kernel
    takes up to 4x the kernel's bytes (:func:`~.codegen.winograd.stored_weight_factor`)."""
    if not (isinstance(call, relax.Call) and len(call.args) > 1
            and isinstance(call.args[1], tvm.ir.GenericConst)):
        return 0
    return int(const_nbytes(call.args[1]) * (stored_weight_factor(call) - 1))


def profile(mod: tvm.IRModule) -> list[BindingCost]:
    """Per-binding FLOPs, weight bytes and output activation bytes of ``main``, in order."""
    rows = []
    for i, b in enumerate(main_block(mod).bindings):
        out = tensor_ref(b.var) if is_tensor(b.var) else None
        flops = op_flops(b.value, out.shape) if out else 0
        weights = weight_bytes(b.value)
        rows.append(BindingCost(i, b.var.name, op_name(b.value), flops, weights, out))
    return rows


def cut_points(mod: tvm.IRModule) -> list[Cut]:
    """For every position after binding ``i`` (except the last), the tensors that cross it.

    A tensor crosses when it is defined at or before ``i`` (or is a model input) and read after
    ``i``, or is defined before and returned by ``main``. Model inputs are not counted: every
    piece that reads one receives it from the caller wherever the cut is.
    """
    bindings = list(main_block(mod).bindings)
    last_use: dict[relax.Var, int] = {}
    for j, b in enumerate(bindings):
        for v in var_inputs(b.value):
            last_use[v] = j
    for v in output_vars(mod["main"]):
        last_use[v] = len(bindings)
    defined_at = {b.var: j for j, b in enumerate(bindings)}
    cuts = []
    live: dict[relax.Var, None] = {}
    for i, b in enumerate(bindings[:-1]):
        live[b.var] = None
        for v in [v for v in live if last_use.get(v, -1) <= i]:
            del live[v]
        crossing = tuple(tensor_ref(v) for v in live if v in defined_at and is_tensor(v))
        cuts.append(Cut(i, crossing))
    return cuts
