"""Outline: turn a device assignment of ``main``'s bindings into per-device piece functions.

This is the one place where splitc decides what a *piece* is; every split strategy ends here.
The split passes rewrite ``main`` (slicing convolutions, tiling rows) and say which device
computes each binding; :class:`OutlinePieces` then groups the bindings into pieces.

A piece is the largest run of one device's bindings that needs nothing from another device
computed after the piece starts. Formally each binding gets a *round*: the highest round among
its producers, plus one when the producer is on another device. One (device, round) pair is one
piece, unless the split pass gave *stages* (a spatial split's segments): then a run is also cut
after each stage whose results another device reads, so that those leave before the device
goes on. Edges between pieces only go to the same or a later round (later when they cross
devices) or to a later cut of the same run, so the pieces form a DAG and can run as soon as
their inputs have arrived.
Bindings on :data:`~splitc.passes.ir.CLIENT` (slices of model inputs) become ``client_p*``
pieces, which extraction turns into slices the caller cuts.

The result, the *split form* of the module, is what :mod:`splitc.planning.extract` cuts apart::

    @R.function
    def dev0_p0(x: ...) -> ...:          # R.func_attr({"splitc.device": 0})
        ...
    @R.function
    def main(x: ...) -> ...:
        with R.dataflow():
            a = cls.dev0_p0(x)
            b = cls.dev1_p0(a)
            R.output(b)
        return b
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.ir import (
    CLIENT,
    DEVICE_ATTR,
    copy_helpers,
    main_block,
    output_vars,
    rebound,
    substitute,
    var_inputs,
)


@dataclass(frozen=True)
class PieceGroup:
    """Bindings of one piece, with the variables that enter and leave it."""

    name: str
    device: int
    bindings: tuple[relax.VarBinding, ...]
    inputs: tuple[relax.Var, ...]
    outputs: tuple[relax.Var, ...]


def _stage_cuts(bindings: list[relax.VarBinding], producer: Mapping[relax.Var, relax.VarBinding],
                rnd: Mapping[relax.Var, int], device_of: Mapping[str, int],
                stage_of: Mapping[str, int]) -> dict[relax.Var, int]:
    """Each binding's index among the pieces its (device, round) run is cut into: a run is
    cut before each stage that follows a stage of the run whose results another device reads.
    """
    sending = {(rnd[v], device_of[v.name], stage_of.get(v.name, 0))
               for b in bindings for v in var_inputs(b.value)
               if v in producer and device_of[v.name] != device_of[b.var.name]}
    cuts: dict[tuple[int, int], list[int]] = {}
    for r, d, s in sorted(sending):
        cuts.setdefault((r, d), []).append(s)
    return {b.var: bisect.bisect_left(cuts.get((rnd[b.var], device_of[b.var.name]), []),
                                      stage_of.get(b.var.name, 0)) for b in bindings}


def group_pieces(func: relax.Function, block: relax.DataflowBlock,
                 device_of: Mapping[str, int],
                 stage_of: Mapping[str, int] | None = None) -> list[PieceGroup]:
    """Analysis half of the outline: the pieces, in an order in which they can run.

    ``stage_of`` (binding name -> stage, non-decreasing along every dependency; default: all
    0) tells where a device's run of bindings may be cut: a piece sends its outputs when it
    ends, so a run is cut after each stage whose results another device reads. A spatial
    tile that needs no rows from its neighbours at a segment's start would otherwise hold
    back the rows they need until it had computed the next segment too."""
    bindings = list(block.bindings)
    missing = [b.var.name for b in bindings if b.var.name not in device_of]
    if missing:
        raise SplitcError(f"no device assigned to {len(missing)} bindings, e.g. {missing[:5]}")
    producer = {b.var: b for b in bindings}
    rnd: dict[relax.Var, int] = {}
    for b in bindings:
        dev = device_of[b.var.name]
        r = 0
        for v in var_inputs(b.value):
            if v in producer:
                r = max(r, rnd[v] + (device_of[v.name] != dev))
        rnd[b.var] = r

    sub = _stage_cuts(bindings, producer, rnd, device_of, stage_of or {})

    def key_of(b: relax.VarBinding) -> tuple[int, int, int]:
        return rnd[b.var], device_of[b.var.name], sub[b.var]

    keys = sorted({key_of(b) for b in bindings})
    per_device_count: dict[int, int] = {}
    names = {}
    for key in keys:
        d = key[1]
        who = "client" if d == CLIENT else f"dev{d}"
        names[key] = f"{who}_p{per_device_count.get(d, 0)}"
        per_device_count[d] = per_device_count.get(d, 0) + 1

    members: dict[tuple[int, int, int], list[relax.VarBinding]] = {k: [] for k in keys}
    for b in bindings:
        members[key_of(b)].append(b)

    returned = set(output_vars(func))
    read_by: dict[relax.Var, set[tuple[int, int, int]]] = {}
    for b in bindings:
        for v in var_inputs(b.value):
            read_by.setdefault(v, set()).add(key_of(b))

    groups = []
    for key in keys:
        own = {b.var for b in members[key]}
        inputs: dict[relax.Var, None] = {}
        for b in members[key]:
            for v in var_inputs(b.value):
                if v not in own:
                    inputs.setdefault(v)
        outputs = tuple(b.var for b in members[key]
                        if b.var in returned or read_by.get(b.var, set()) - {key})
        groups.append(PieceGroup(names[key], key[1], tuple(members[key]), tuple(inputs),
                                 outputs))
    return groups


def build_split_module(mod: tvm.IRModule, groups: list[PieceGroup]) -> tvm.IRModule:
    """Rewrite half of the outline: one function per piece, ``main`` calling them in order."""
    func = mod["main"]
    bb = relax.BlockBuilder()
    gvars = {}
    for g in groups:
        params = [relax.Var(v.name, v.ty) for v in g.inputs]
        vmap: dict[relax.Var, relax.Expr] = dict(zip(g.inputs, params, strict=True))
        with bb.function(g.name, params, attrs={DEVICE_ATTR: g.device}, private=False):
            with bb.dataflow():
                for b in g.bindings:
                    emit = bb.emit_output if b.var in g.outputs else bb.emit
                    vmap[b.var] = emit(rebound(b.value, vmap, b.var.ty), name_hint=b.var.name)
            outs = [vmap[v] for v in g.outputs]
            gvars[g.name] = bb.emit_func_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))

    params = [relax.Var(p.name, p.ty) for p in func.params]
    vmap = dict(zip(func.params, params, strict=True))
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs else {}
    returned = set(output_vars(func))

    def bind(name: str, value: relax.Expr, *, output: bool) -> relax.Var:
        """Bind ``value`` to a variable named exactly ``name``: tensors keep their names
        across pieces and ``main`` (the block builder would make them unique per module)."""
        value = bb.normalize(value)
        var = (relax.Var if output else relax.DataflowVar)(name, value.ty)
        bb.emit_normalized(relax.VarBinding(var, value))
        return var

    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            for g in groups:
                call = relax.Call(gvars[g.name], [vmap[v] for v in g.inputs])
                if len(g.outputs) == 1:
                    v = g.outputs[0]
                    vmap[v] = bind(v.name, call, output=v in returned)
                    continue
                tup = bind(g.name, call, output=False)
                for i, v in enumerate(g.outputs):
                    vmap[v] = bind(v.name, relax.TupleGetItem(tup, i), output=v in returned)
        bb.emit_func_output(substitute(func.body.body, vmap))
    return copy_helpers(mod, bb.get())


@tvm.transform.module_pass(opt_level=0, name="splitc.OutlinePieces")
class OutlinePieces:
    """Group ``main``'s bindings into per-device piece functions.

    Parameters
    ----------
    device_of : Mapping[str, int]
        Device index of every binding of ``main``, keyed by the bound variable's name.
    stage_of : Mapping[str, int], optional
        Stage of the bindings (see :func:`group_pieces`); default: one stage.
    """

    def __init__(self, device_of: Mapping[str, int], stage_of: Mapping[str, int] | None = None):
        self.device_of = dict(device_of)
        self.stage_of = dict(stage_of or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        block = main_block(mod)
        groups = group_pieces(mod["main"], block, self.device_of, self.stage_of)
        return build_split_module(mod, groups)
