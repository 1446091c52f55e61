"""Extraction: cut a module in split form into one IRModule per device plus the plan.

The split form (see :mod:`splitc.passes.split.outline`) has piece functions tagged with a device
index and a ``main`` that only calls them. Extraction reads ``main`` to find every tensor that
goes from one device to another (a *transfer*: name, shape, dtype, bytes), what the caller
sends in and receives back, and the order pieces run in, and states them in the runtime's own
plan schema (:mod:`splitc.runtime.plan`), devices by name. Each device's module holds its
pieces with their weights lifted out of the code into parameters, so a device folder is a
library plus a weights file and weights can be replaced without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

import splitc
from splitc.errors import SplitcError
from splitc.passes.analysis import function_flops, winograd_extra_bytes
from splitc.passes.ir import (
    CLIENT,
    DEVICE_ATTR,
    const_array,
    const_nbytes,
    lift_constants,
    main_block,
    op_name,
    output_vars,
    static_shape,
)
from splitc.planning.cluster import device_names
from splitc.runtime.plan import Device, Endpoint, Piece, Plan, Slice, Tensor, Transfer


@dataclass
class Extracted:
    """Everything a compiled plan needs from the split module, in the runtime's terms."""

    #: each device's pieces (weights lifted into parameters), by device name
    modules: dict[str, tvm.IRModule]
    #: the lifted constants of each piece, as TVM holds them (see :attr:`weights`)
    constants: dict[str, list[tvm.ir.GenericConst]]
    pieces: tuple[Piece, ...]
    #: every tensor of the plan by name: model inputs, what pieces and the client's slices make
    tensors: dict[str, Tensor]
    transfers: tuple[Transfer, ...]
    inputs: tuple[Endpoint, ...]
    outputs: tuple[Endpoint, ...]  # named after their tensors until :meth:`plan` names them
    slices: tuple[Slice, ...]
    names: tuple[str, ...]  # device index in the split form -> device name
    #: what a user calls each tensor (see :func:`labels`)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def transfer_bytes(self) -> int:
        """Bytes the devices send each other per inference."""
        return sum(t.nbytes for t in self.transfers)

    @functools.cached_property
    def weights(self) -> dict[str, list[np.ndarray]]:
        """Each piece's weights as arrays, in parameter order (copied out of TVM on first use:
        pricing a candidate split needs only their sizes)."""
        return {name: [const_array(c) for c in consts]
                for name, consts in self.constants.items()}

    def plan(self, targets: Sequence[str], strategy: str, source: str = "",
             output_names: Sequence[str] | None = None) -> Plan:
        """The plan for these devices' ``targets`` (library hashes are filled in by the
        build). ``output_names``: the model's names for its outputs (ONNX output names);
        default: the names of their tensors."""
        if len(targets) != len(self.names):
            raise SplitcError(f"the split has {len(self.names)} devices, got "
                              f"{len(targets)} targets")
        outputs = self.outputs
        if output_names and len(output_names) == len(outputs):
            outputs = tuple(dataclasses.replace(e, name=n)
                            for e, n in zip(outputs, output_names, strict=True))
        return Plan(
            strategy=strategy,
            devices=tuple(Device(n, t, i, n) for i, (n, t) in
                          enumerate(zip(self.names, targets, strict=True))),
            pieces=self.pieces, tensors=dict(self.tensors), transfers=self.transfers,
            inputs=self.inputs, outputs=outputs, source=source,
            versions={"splitc": splitc.__version__, "tvm": tvm.__version__},
            slices=self.slices, labels=dict(self.labels))


def _tensor(var: relax.Var) -> Tensor:
    return Tensor(static_shape(var), str(var.ty.dtype))


def client_slices(func: relax.Function, args: list[relax.Var]) -> dict[relax.Var, Slice]:
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
            out[b.var] = Slice(b.var.name, source[call.args[0]].name, axis, begin, end)
    return out


def extract(mod: tvm.IRModule, names: Sequence[str] | None = None,
            layer_names: Mapping[str, str] | None = None) -> Extracted:
    """Cut a split-form module into per-device modules and the transfers between them.

    ``names``: the name of each device index of the split form (a cluster file's names);
    default ``dev0``, ``dev1``, ... ``layer_names``: the model's names of ``main``'s original
    bindings (:attr:`splitc.frontend.ImportedModel.layer_names`), for the tensors' labels."""
    main = mod["main"]
    device_of_piece: dict[str, int] = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs and DEVICE_ATTR in func.attrs:
            device_of_piece[gv.name_hint] = int(func.attrs[DEVICE_ATTR])
    if not device_of_piece:
        raise SplitcError("the module is not in split form: no function has a device")
    n = max(device_of_piece.values()) + 1
    names = tuple(names) if names is not None else tuple(device_names(n))
    if len(names) < n or len(set(names)) != len(names):
        raise SplitcError(f"the split uses {n} devices; got names {list(names)}")

    produced_on: dict[relax.Var, int] = {}
    tensors = {p.name: _tensor(p) for p in main.params}
    pieces: list[Piece] = []
    transfers: dict[tuple[str, int], Transfer] = {}
    constants: dict[str, list[tvm.ir.GenericConst]] = {}
    per_device: dict[int, dict[str, relax.Function]] = {}
    tuple_outputs: dict[relax.Var, dict[int, str]] = {}
    pending: dict[relax.Var, Piece] = {}
    slices: dict[str, Slice] = {}
    params = set(main.params)

    for b in main_block(mod).bindings:
        value = b.value
        if isinstance(value, relax.TupleGetItem):
            tensors[b.var.name] = _tensor(b.var)
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
                    tensors[var.name] = _tensor(var)
            produced_on[b.var] = CLIENT
            continue
        arg_names = []
        for a in value.args:
            if not isinstance(a, relax.Var):
                raise SplitcError(f"piece {name} takes a non-variable argument")
            arg_names.append(a.name)
            src = produced_on.get(a)
            if src is not None and src not in (device, CLIENT):
                transfers.setdefault((a.name, device), Transfer(
                    a.name, names[src], names[device], _tensor(a).nbytes))
        flops = function_flops(mod[name])
        func, consts = lift_constants(mod[name])
        wbytes = sum(const_nbytes(c) for c in consts) + sum(
            winograd_extra_bytes(b.value) for blk in mod[name].body.blocks for b in blk.bindings)
        per_device.setdefault(device, {})[name] = func
        constants[name] = consts
        produced_on[b.var] = device
        outputs = ()
        if isinstance(b.var.ty, relax.TensorType):
            tensors[b.var.name] = _tensor(b.var)
            outputs = (b.var.name,)
        piece = Piece(name, names[device], tuple(arg_names), outputs, len(consts), flops, wbytes)
        if not outputs:
            pending[b.var] = piece
        pieces.append(piece)

    for var, piece in pending.items():  # a piece with several outputs: its projections' names
        i = pieces.index(piece)
        outs = tuple_outputs.get(var, {})
        if sorted(outs) != list(range(len(outs))):
            raise SplitcError(f"piece {piece.name}: every output must be read in main")
        pieces[i] = dataclasses.replace(piece, outputs=tuple(outs[k] for k in range(len(outs))))

    modules = {}
    for device, funcs in sorted(per_device.items()):
        device_mod = tvm.IRModule({tvm.ir.GlobalVar(n): f.with_attr("global_symbol", n)
                                   for n, f in funcs.items()})
        for func in funcs.values():  # kernels the pieces call (e.g. call_tir from the importer)
            for gv in relax.analysis.all_global_vars(func):
                if gv.name_hint not in funcs:
                    device_mod[gv] = mod[gv]
        modules[names[device]] = device_mod
    outputs = tuple(Endpoint(v.name, v.name, names[produced_on[v]])
                    for v in output_vars(main))
    ops = {b.var.name: op_name(b.value) for gv, f in mod.functions.items()
           if isinstance(f, relax.Function) and gv.name_hint in device_of_piece
           for blk in f.body.blocks for b in blk.bindings}
    return Extracted(modules, constants, tuple(pieces), tensors, tuple(transfers.values()),
                     tuple(Endpoint(p.name, p.name) for p in main.params), outputs,
                     tuple(slices.values()), names,
                     labels(tensors, ops, slices.values(), layer_names or {}))


#: The suffixes the split passes give the parts of a tensor (see their rewriters): a row tile,
#: rows cut for a device, a channel slice, input channels, a gathered whole, an output alias,
#: and the number that makes a name unique.
_ROLE = re.compile(r"_(t|r|c|in|g|at|out)?(\d*)$")


def labels(tensors: Mapping[str, Tensor], ops: Mapping[str, str], slices,
           layer_names: Mapping[str, str]) -> dict[str, str]:
    """What a user calls each tensor: the layer that makes it — its name in the model where
    known, else its operator — with the part of it the tensor is (rows of a tile, channels of
    a slice, gathered), e.g. ``/layer2/layer2.0/conv1/Conv, 7 rows``."""
    cut = {s.tensor: s for s in slices}
    out = {}
    for name, t in tensors.items():
        if name in cut:
            s = cut[name]
            out[name] = f"{s.source}, rows {s.begin}-{s.end - 1}"
            continue
        base, parts = name, []
        while True:
            m = _ROLE.search(base)
            if not m or m.end() == m.start() or m.start() == 0:
                break
            parts.append(m.group(1))
            base = base[:m.start()]
        op = ops.get(base) or next((ops[n] for n in (f"{base}_t0", f"{base}_c0", name)
                                    if n in ops), "tensor")
        layer = layer_names.get(base) or f"{op} {base}"
        role = ""
        if "t" in parts or "r" in parts:
            rows = t.shape[2] if len(t.shape) == 4 else 0
            role = f", {rows} row{'s' * (rows != 1)}" if rows else ", rows"
        elif "c" in parts or "in" in parts:
            axis = 1 if len(t.shape) == 4 else len(t.shape) - 1
            role = f", {t.shape[axis]} channels"
        elif "g" in parts or "at" in parts:
            role = ", gathered"
        out[name] = layer + role
    return out
