"""Extraction: cut a module in split form into one IRModule per device plus its boundaries.

The split form (see :mod:`splitc.passes.outline`) has piece functions tagged with a device and
a ``main`` that only calls them. Extraction reads ``main`` to find every tensor that goes from
one device to another (a *transfer*: name, shape, dtype, bytes), what the caller sends in and
receives back, and the order pieces run in. Each device's module holds its pieces with their
weights lifted out of the code into parameters, so a device folder is a library plus a weights
file and weights can be replaced without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError

from .analysis import function_flops, winograd_extra_bytes
from .ir import (
    CLIENT,
    DEVICE_ATTR,
    TensorRef,
    const_array,
    const_nbytes,
    main_block,
    op_name,
    output_vars,
    tensor_ref,
)


@dataclass(frozen=True)
class PieceCall:
    """One call of a piece: which device runs it and which tensors go in and out."""

    name: str
    device: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_weights: int
    flops: int = 0
    weight_bytes: int = 0


@dataclass(frozen=True)
class Transfer:
    """A tensor sent from device ``src`` to device ``dst``."""

    tensor: TensorRef
    src: int
    dst: int


@dataclass(frozen=True)
class InputSlice:
    """A part of a model input the caller cuts and sends: ``source[begin:end]`` on ``axis``."""

    tensor: TensorRef
    source: str
    axis: int
    begin: int
    end: int


@dataclass
class Extracted:
    """Everything a compiled plan needs from the split module."""

    modules: dict[int, tvm.IRModule]
    #: the lifted constants of each piece, as TVM holds them (see :attr:`weights`)
    constants: dict[str, list[tvm.ir.GenericConst]]
    pieces: list[PieceCall]
    tensors: dict[str, TensorRef]
    transfers: list[Transfer]
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    output_device: dict[str, int] = field(default_factory=dict)
    slices: list[InputSlice] = field(default_factory=list)

    @property
    def transfer_bytes(self) -> int:
        """Bytes the devices send each other per inference."""
        return sum(t.tensor.nbytes for t in self.transfers)

    @property
    def all_tensors(self) -> dict[str, TensorRef]:
        """Every tensor of the plan by name: the model inputs and what the pieces and the
        client's slices produce."""
        return {**{t.name: t for t in self.inputs}, **self.tensors}

    @functools.cached_property
    def weights(self) -> dict[str, list[np.ndarray]]:
        """Each piece's weights as arrays, in parameter order (copied out of TVM on first use:
        pricing a candidate split needs only their sizes)."""
        return {name: [const_array(c) for c in consts]
                for name, consts in self.constants.items()}


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


def _lift(func: relax.Function) -> tuple[relax.Function, list[tvm.ir.GenericConst]]:
    lifter = _LiftConstants()
    body = lifter.visit_expr(func.body)
    params = list(func.params) + lifter.params
    attrs = dict(func.attrs.items()) if func.attrs else {}
    attrs["num_input"] = len(func.params)
    new = relax.Function(params, body, func.ret_ty, func.is_pure).with_attrs(attrs)
    return new, lifter.consts


def lift_weights(func: relax.Function) -> tuple[relax.Function, list[np.ndarray]]:
    """``func`` with its constants turned into trailing parameters, and their values."""
    new, consts = _lift(func)
    return new, [const_array(c) for c in consts]


def client_slices(func: relax.Function, args: list[relax.Var]) -> dict[relax.Var, InputSlice]:
    """The slices a client piece cuts: each of its bindings must slice one axis of one of
    its parameters (which ``args``, parameters of ``main``, fill)."""
    source = dict(zip(func.params, args, strict=True))
    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and op_name(call) == "strided_slice"
                    and call.args[0] in source and len(call.args[1].fields) == 1
                    and (len(call.args) < 5 or all(int(s.value) == 1
                                                   for s in call.args[4].fields))):
                raise SplitcError(f"the client can only slice model inputs; {b.var.name} "
                                  "is something else")
            axis, begin, end = (int(call.args[i].fields[0].value) for i in (1, 2, 3))
            out[b.var] = InputSlice(tensor_ref(b.var), source[call.args[0]].name, axis, begin,
                                    end)
    return out


def extract(mod: tvm.IRModule) -> Extracted:
    """Cut a split-form module into per-device modules and the transfers between them."""
    main = mod["main"]
    device_of_piece: dict[str, int] = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs and DEVICE_ATTR in func.attrs:
            device_of_piece[gv.name_hint] = int(func.attrs[DEVICE_ATTR])
    if not device_of_piece:
        raise SplitcError("the module is not in split form: no function has a device")

    produced_on: dict[relax.Var, int] = {}
    tensors: dict[str, TensorRef] = {}
    pieces: list[PieceCall] = []
    transfers: dict[tuple[str, int], Transfer] = {}
    inputs = [tensor_ref(p) for p in main.params]
    constants: dict[str, list[tvm.ir.GenericConst]] = {}
    per_device: dict[int, dict[str, relax.Function]] = {}
    tuple_outputs: dict[relax.Var, dict[int, str]] = {}
    pending: dict[relax.Var, PieceCall] = {}
    slices: dict[str, InputSlice] = {}
    params = set(main.params)

    for b in main_block(mod).bindings:
        value = b.value
        if isinstance(value, relax.TupleGetItem):
            tensors[b.var.name] = tensor_ref(b.var)
            produced_on[b.var] = produced_on[value.tuple_value]
            tuple_outputs.setdefault(value.tuple_value, {})[value.index] = b.var.name
            continue
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)
                and value.op.name_hint in device_of_piece):
            raise SplitcError(f"main of a split module may only call pieces; {b.var.name} "
                              "is computed in main")
        name = value.op.name_hint
        device = device_of_piece[name]
        if device == CLIENT:  # slices the caller cuts from model inputs: no piece, no transfer
            if not all(a in params for a in value.args):
                raise SplitcError(f"client piece {name} reads something besides model inputs")
            # (outline keeps a piece's output names in main, tuple outputs included)
            returned = {v.name for v in output_vars(mod[name])}
            for var, cut in client_slices(mod[name], list(value.args)).items():
                if var.name in returned:
                    slices[var.name] = cut
                    tensors[var.name] = cut.tensor
            produced_on[b.var] = CLIENT
            continue
        arg_names = []
        for a in value.args:
            if not isinstance(a, relax.Var):
                raise SplitcError(f"piece {name} takes a non-variable argument")
            arg_names.append(a.name)
            src = produced_on.get(a)
            if src is not None and src not in (device, CLIENT):
                ref = tensor_ref(a)
                transfers.setdefault((ref.name, device), Transfer(ref, src, device))
        flops = function_flops(mod[name])
        func, consts = _lift(mod[name])
        wbytes = sum(const_nbytes(c) for c in consts) + sum(
            winograd_extra_bytes(b.value) for blk in mod[name].body.blocks for b in blk.bindings)
        per_device.setdefault(device, {})[name] = func
        constants[name] = consts
        produced_on[b.var] = device
        outputs = ()
        if isinstance(b.var.ty, relax.TensorType):
            tensors[b.var.name] = tensor_ref(b.var)
            outputs = (b.var.name,)
        call = PieceCall(name, device, tuple(arg_names), outputs, len(consts), flops, wbytes)
        if not outputs:
            pending[b.var] = call
        pieces.append(call)

    for var, call in pending.items():  # a piece with several outputs: its projections' names
        i = pieces.index(call)
        names = tuple_outputs.get(var, {})
        if sorted(names) != list(range(len(names))):
            raise SplitcError(f"piece {call.name}: every output must be read in main")
        pieces[i] = dataclasses.replace(call, outputs=tuple(names[k] for k in range(len(names))))

    outs = [tensor_ref(v) for v in output_vars(main)]
    modules = {}
    for device, funcs in sorted(per_device.items()):
        device_mod = tvm.IRModule({tvm.ir.GlobalVar(n): f.with_attr("global_symbol", n)
                                   for n, f in funcs.items()})
        for func in funcs.values():  # kernels the pieces call (e.g. call_tir from the importer)
            for gv in relax.analysis.all_global_vars(func):
                if gv.name_hint not in funcs:
                    device_mod[gv] = mod[gv]
        modules[device] = device_mod
    return Extracted(modules, constants, pieces, tensors, list(transfers.values()), inputs, outs,
                     {o.name: produced_on[v] for o, v in zip(outs, output_vars(main),
                                                              strict=True)},
                     list(slices.values()))
