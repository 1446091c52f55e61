"""Branch rewrite: a CNN turned into K nearly independent branches, one per device, that
exchange activations only at a few chosen *sync points* (NoNN's knowledge partitioning and
separable ResNeXt's transmission policy, as a compiler pass that works on any imported CNN).

Analysis (:func:`analyse`, :func:`plan_branches`):

1. **Structure.** Each binding of ``main`` is classified by what it does to channels
   (:class:`Structure`): a *partitioned* tensor has a channel axis (axis 1 of NCHW, the last
   axis of a channels-last or ``[N, C]`` tensor), and its channels will be spread over the
   branches; a *whole* tensor lives on one device. Channel *nodes* ``(tensor, channel)`` are
   related where one op carries a channel to another: element-wise ops, pools, per-channel
   constants, depthwise convolutions, reductions over other axes, layer norms, transposes and
   reshapes that keep the channel axis relate channel ``c`` to ``c``; a **concat** relates
   each part's channel ``j`` to its offset in the result; **split / strided_slice** the
   other way round; a **channel shuffle** (reshape → transpose → reshape, found by running
   the chain on channel indices) relates ``j`` to ``σ(j)``. Related nodes form a *class* (one
   feature), and a class lies in one branch. Grouped convolutions and group norms tie their
   groups' classes into *atoms* that stay in one branch too. An op the pass does not know
   makes its result whole: a sync point where every branch's part is gathered — never an
   error.
2. **Knowledge partitioning.** Atoms are assigned to branches: first contiguously (tensor by
   tensor, channel ``c`` of ``C`` to branch ``c * K // C``), then moved by balanced swaps
   (Kernighan–Lin style: two interchangeable atoms trade branches when that raises the weight
   mass inside branches) over the graph whose edges are the dense layers' weights
   ``|W[o, i]|`` (each layer normalised to total 1) and, given activations on calibration
   data, how strongly two channels of a tensor fire together (``|corr|``, NoNN's co-firing).
3. **Transmission policy.** A *candidate* is a place where branches may either exchange or
   not: a dense convolution or matmul between two partitioned tensors (cut: each branch reads
   only its own channels, the diagonal blocks of the weight; kept: an all-gather of its
   input), and a layer norm over channels (cut: each branch normalises over its own channels;
   kept: the branches exchange one (mean, sum of squares) pair per position).
   :func:`sync_candidates` prices each: bytes saved by cutting, weight mass dropped. The
   policy (which candidates stay sync points) comes from :func:`choose_sync` or the caller.

Rewrite (:class:`BranchRewrite`): applies a :class:`BranchPlan`. Every partitioned tensor
becomes K tensors, one per branch, each holding that branch's channels in their original
order; every op is emitted once per branch on its part (constants sliced to the part's
channels, a concat concatenates parts, a shuffle becomes a gather within each part, a
grouped convolution keeps the groups of the part), and sync points gather. The result (the
*branch model*) is an ordinary Relax module: torch trains it
(:class:`~splitc.backend.torch_program.TorchProgram`), TVM builds it. With every candidate
kept it computes what the original does. :func:`branch_devices` says which device computes
each of its bindings (branch k on device k, whole ops on device 0) and :class:`BranchSplit`
outlines it into per-device pieces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from splitc import optional
from splitc.errors import SplitcError
from splitc.passes.ir import (
    const_array,
    copy_helpers,
    main_block,
    op_name,
    output_vars,
    static_shape,
    substitute,
    tensor_ref,
    var_inputs,
)
from splitc.passes.ops import (
    BINARY_ELEMENTWISE,
    PER_CHANNEL_NCHW,
    REDUCTIONS,
    UNARY_ELEMENTWISE,
)
from splitc.passes.split.outline import OutlinePieces

#: Balanced swaps: at most this many per class of interchangeable atoms and round; classes
#: larger than MAX_CLASS keep the contiguous partition (the gain matrix is MAX_CLASS^2).
MAX_SWAPS, MAX_CLASS = 256, 2048
#: :func:`_best_swap` rates exactly this many atoms per branch pair and side before bounding.
SWAP_TOP = 32
#: Element-wise ops beyond :data:`~splitc.passes.ops.UNARY_ELEMENTWISE` that keep channels.
UNARY_MORE = {"nn.gelu_tanh", "nn.softplus", "nn.leakyrelu", "sin", "cos", "sign",
              "nn.hardswish", "nn.hardsigmoid", "nn.selu", "nn.elu", "reciprocal"}
REDUCE_MORE = {"variance", "std", "prod"}
#: Ops the shuffle detector may follow (each reads one tensor and only moves its elements).
MOVES = {"reshape", "permute_dims", "flatten"}


# -- structure ---------------------------------------------------------------------------------
@dataclass
class Step:
    """How one binding treats channels (see :class:`Structure`)."""

    kind: str            # dense | grouped | same | concat | slice | shuffle | layer_norm |
    #                      group_norm | whole | skip (a shuffle's inner moves, a split tuple)
    src: str | None = None          # the (channel) input
    index: np.ndarray | None = None  # slice / shuffle: output channel j is input channel index[j]
    ratio: int = 1                   # a reshape that groups channels: r input channels per
    #                                  output channel (r > 1), or splits them (1 / -r, r < -1)

    def source(self, out: np.ndarray) -> np.ndarray:
        """The input channels that output channels ``out`` are made of."""
        if self.ratio > 1:
            return (out[:, None] * self.ratio + np.arange(self.ratio)[None, :]).reshape(-1)
        if self.ratio < -1:
            return np.unique(out // -self.ratio)
        return out


@dataclass
class Layer:
    """A convolution or matmul with constant weights from ``src`` to ``dst``."""

    name: str
    op: str
    src: str
    dst: str
    weight: np.ndarray  # OIHW, or [C_in, C_out] for matmul
    groups: int = 1
    in_bytes: int = 0


class Structure:
    """Which tensors of ``main`` are partitioned (their channel axis), how each binding treats
    channels (:class:`Step`), the channel relations (pairs of node arrays) and atoms.

    Parameters
    ----------
    mod : IRModule
        The imported model (one dataflow block in ``main``, constant weights).
    k : int
        Number of branches (group norms with fewer groups than branches stay whole).
    """

    def __init__(self, mod: tvm.IRModule, k: int):
        self.k = k
        mod = unique_names(mod)
        self.mod = mod
        func = mod["main"]
        self.block = main_block(mod)
        self.bindings = {b.var.name: b for b in self.block.bindings}
        self.params = {p.name for p in func.params}
        self.outputs = [v.name for v in output_vars(func)]
        self.axis: dict[str, int] = {}       # partitioned tensor -> its channel axis
        self.channels: dict[str, int] = {}
        self.steps: dict[str, Step] = {}
        self.layers: dict[str, Layer] = {}
        self.relations: list[tuple[str, np.ndarray, str, np.ndarray]] = []
        self.atoms: list[list[tuple[str, np.ndarray]]] = []
        self.users: dict[str, list[str]] = {}
        for b in self.block.bindings:
            for v in var_inputs(b.value):
                self.users.setdefault(v.name, []).append(b.var.name)
        self.head = self._head()
        for b in self.block.bindings:
            if b.var.name not in self.steps:
                self.steps[b.var.name] = self._classify(b)

    # the classifier head: what the outputs are computed from without a dense layer between
    def _head(self) -> set[str]:
        head, todo = set(), list(self.outputs)
        while todo:
            v = todo.pop()
            if v in head or v not in self.bindings:
                continue
            head.add(v)
            value = self.bindings[v].value
            if _dense_op(value) is None:
                todo.extend(x.name for x in var_inputs(value))
        return head

    def parts(self, name: str) -> bool:
        return name in self.axis

    def _part(self, var: relax.Var, axis: int) -> None:
        self.axis[var.name] = axis
        self.channels[var.name] = static_shape(var)[axis]

    def _same(self, a: str, b: str) -> None:
        idx = np.arange(self.channels[a])
        self.relations.append((a, idx, b, idx))

    def _classify(self, b: relax.VarBinding) -> Step:
        var, value = b.var, b.value
        if isinstance(value, relax.TupleGetItem):
            return self._tuple_item(var, value)
        if not isinstance(value, relax.Call) or not isinstance(var.ty, relax.TensorType) \
                and op_name(value) != "split":
            return Step("whole")
        name = op_name(value)
        ins = [v for v in var_inputs(value) if self.parts(v.name)]
        dense = _dense_op(value)
        try:
            if dense is not None:
                return self._dense(var, value, dense)
            if not ins:
                return Step("whole")
            src = value.args[0] if isinstance(value.args[0], relax.Var) else None
            if name in UNARY_ELEMENTWISE or name in UNARY_MORE:
                return self._keep(var, src, self.axis.get(src.name) if src is not None else None)
            if name in BINARY_ELEMENTWISE:
                return self._binary(var, value)
            if name in PER_CHANNEL_NCHW and src is not None and self.axis.get(src.name) == 1:
                return self._keep(var, src, 1)
            if name in REDUCTIONS or name in REDUCE_MORE:
                return self._reduction(var, value)
            if name == "permute_dims":
                return self._permute(var, value)
            if name in ("reshape", "flatten"):
                return self._reshape(var, value)
            if name == "nn.conv2d":
                return self._grouped(var, value)
            if name == "concat":
                return self._concat(var, value)
            if name in ("strided_slice", "split"):
                return self._slice(var, value)
            if name in ("nn.softmax", "nn.log_softmax"):
                ax = self.axis.get(src.name) if src is not None else None
                if ax is not None and int(value.attrs.axis) % len(static_shape(var)) != ax:
                    return self._keep(var, src, ax)
            if name == "nn.layer_norm":
                return self._layer_norm(var, value)
            if name == "nn.group_norm":
                return self._group_norm(var, value)
        except SplitcError:  # (a dynamic shape somewhere): leave the op whole
            pass
        return Step("whole")

    def _keep(self, var, src, axis) -> Step:
        if src is None or axis is None or static_shape(var)[axis] != self.channels[src.name] \
                or len(static_shape(var)) != len(static_shape(src)):
            return Step("whole")
        self._part(var, axis)
        self._same(var.name, src.name)
        return Step("same", src.name)

    def _dense(self, var, value, op) -> Step:
        src = value.args[0]
        w = const_array(value.args[1])
        if var.name in self.head:
            return Step("whole")
        if op == "nn.conv2d" and int(value.attrs.groups) > 1:
            return self._grouped(var, value)
        if op == "matmul":
            rank = len(static_shape(src))
            if self.parts(src.name) and self.axis[src.name] != rank - 1:
                return Step("whole")
            self._part(var, len(static_shape(var)) - 1)
        else:
            if self.parts(src.name) and self.axis[src.name] != 1:
                return Step("whole")
            self._part(var, 1)
        self.layers[var.name] = Layer(var.name, op, src.name, var.name, w, 1, _nbytes(src))
        return Step("dense", src.name)

    def _grouped(self, var, value) -> Step:
        if _dense_op(value) is None or var.name in self.head:
            return Step("whole")
        src = value.args[0]
        groups = int(value.attrs.groups)
        c_in, c_out = static_shape(src)[1], static_shape(var)[1]
        if self.parts(src.name) and self.axis[src.name] != 1:
            return Step("whole")
        self._part(var, 1)
        w = const_array(value.args[1])
        self.layers[var.name] = Layer(var.name, "nn.conv2d", src.name, var.name, w, groups,
                                      _nbytes(src))
        if self.parts(src.name) and groups == c_in == c_out:  # depthwise: channel to channel
            self._same(var.name, src.name)
            return Step("grouped", src.name)
        per_in, per_out = c_in // groups, c_out // groups
        for g in range(groups):
            atom = [(var.name, np.arange(g * per_out, (g + 1) * per_out))]
            if self.parts(src.name):
                atom.append((src.name, np.arange(g * per_in, (g + 1) * per_in)))
            self.atoms.append(atom)
        return Step("grouped", src.name)

    def _binary(self, var, value) -> Step:
        shape = static_shape(var)
        rank = len(shape)
        axes = set()
        for a in value.args:
            if isinstance(a, relax.Var) and self.parts(a.name):
                ax = self.axis[a.name] + rank - len(static_shape(a))
                if static_shape(a)[self.axis[a.name]] == shape[ax]:
                    axes.add(ax)
        if len(axes) != 1:
            return Step("whole")
        ax = axes.pop()
        same = []
        for a in value.args:
            if not isinstance(a, relax.Var | tvm.ir.GenericConst) or not _is_tensor(a):
                continue
            ashape = static_shape(a)
            aligned = ax - (rank - len(ashape))
            if isinstance(a, relax.Var) and self.parts(a.name):
                if self.axis[a.name] == aligned and ashape[aligned] == shape[ax]:
                    same.append(a.name)
                elif aligned >= 0 and ashape[aligned] != 1:
                    return Step("whole")
            elif aligned >= 0 and ashape[aligned] not in (1, shape[ax]):
                return Step("whole")
        self._part(var, ax)
        for s in same:
            self._same(var.name, s)
        return Step("same", same[0])

    def _reduction(self, var, value) -> Step:
        src = value.args[0]
        if not self.parts(src.name) or value.attrs.axis is None:
            return Step("whole")
        rank = len(static_shape(src))
        axes = [int(a) % rank for a in value.attrs.axis]
        ax = self.axis[src.name]
        if ax in axes:
            return Step("whole")
        out = ax if bool(value.attrs.keepdims) else ax - sum(a < ax for a in axes)
        return self._keep_axis(var, src, out)

    def _keep_axis(self, var, src, out_axis) -> Step:
        if static_shape(var)[out_axis] != self.channels[src.name]:
            return Step("whole")
        self._part(var, out_axis)
        self._same(var.name, src.name)
        return Step("same", src.name)

    def _permute(self, var, value) -> Step:
        src = value.args[0]
        rank = len(static_shape(src))
        axes = (list(range(rank))[::-1] if value.attrs.axes is None
                else [int(a) % rank for a in value.attrs.axes])
        return self._keep_axis(var, src, axes.index(self.axis[src.name]))

    def _reshape(self, var, value) -> Step:
        src = value.args[0]
        a, b = static_shape(src), static_shape(var)
        ax = self.axis[src.name]
        before = int(np.prod(a[:ax]))
        for j in range(len(b)):
            if int(np.prod(b[:j])) == before and b[j] == a[ax]:
                return self._keep_axis(var, src, j)
        step = self._shuffle(var, src)
        if step.kind != "whole":
            return step
        for j in range(len(b)):  # channels grouped (a group norm's view) or split back
            if int(np.prod(b[:j])) != before or min(a[ax], b[j]) < self.k:
                continue
            if a[ax] % b[j] == 0 and b[j] < a[ax]:
                r = a[ax] // b[j]
                self._part(var, j)
                out = np.repeat(np.arange(b[j]), r)
                self.relations.append((var.name, out, src.name, np.arange(a[ax])))
                return Step("same", src.name, ratio=r)
            if b[j] % a[ax] == 0 and b[j] > a[ax]:
                r = b[j] // a[ax]
                self._part(var, j)
                self.relations.append((var.name, np.arange(b[j]), src.name,
                                       np.arange(b[j]) // r))
                return Step("same", src.name, ratio=-r)
        return Step("whole")

    def _shuffle(self, var, src) -> Step:
        """A chain of moves from ``src`` (reshape, transpose, reshape) that ends in a tensor
        of ``src``'s shape whose channels are a permutation of ``src``'s: a channel shuffle."""
        chain, cur = [var.name], var.name
        shape = static_shape(src)
        ax = self.axis[src.name]
        while True:
            nxt = self.users.get(cur, [])
            if len(nxt) != 1 or op_name(self.bindings[nxt[0]].value) not in MOVES \
                    or cur in self.outputs:
                return Step("whole")
            cur = nxt[0]
            chain.append(cur)
            if static_shape(self.bindings[cur].var) == shape:
                break
            if len(chain) > 8:
                return Step("whole")
        ch = np.broadcast_to(np.arange(shape[ax]).reshape([-1 if i == ax else 1
                                                           for i in range(len(shape))]), shape)
        pos = np.broadcast_to(np.arange(int(np.prod(shape)) // shape[ax]).reshape(
            [s for i, s in enumerate(shape) if i != ax]).reshape(
            [1 if i == ax else s for i, s in enumerate(shape)]), shape)
        pos0 = pos
        for name in chain:
            call = self.bindings[name].value
            if op_name(call) == "permute_dims":
                r = ch.ndim
                axes = (list(range(r))[::-1] if call.attrs.axes is None
                        else [int(x) % r for x in call.attrs.axes])
                ch, pos = ch.transpose(axes), pos.transpose(axes)
            else:
                out = static_shape(self.bindings[name].var)
                ch, pos = ch.reshape(out), pos.reshape(out)
        first = np.moveaxis(ch, ax, 0).reshape(shape[ax], -1)
        if not (first == first[:, :1]).all() or not np.array_equal(pos, pos0):
            return Step("whole")
        index = first[:, 0].copy()
        if sorted(index.tolist()) != list(range(shape[ax])):
            return Step("whole")
        end = self.bindings[chain[-1]].var
        for name in chain[:-1]:
            self.steps[name] = Step("skip")
        self._part(end, ax)
        self.relations.append((end.name, np.arange(shape[ax]), src.name, index))
        self.steps[end.name] = Step("shuffle", src.name, index)
        return Step("skip")

    def _concat(self, var, value) -> Step:
        fields = list(value.args[0].fields)
        ax = int(value.attrs.axis) % len(static_shape(var))
        if not all(isinstance(f, relax.Var) and self.parts(f.name) and self.axis[f.name] == ax
                   for f in fields):
            return Step("whole")
        self._part(var, ax)
        off = 0
        for f in fields:
            n = self.channels[f.name]
            self.relations.append((var.name, np.arange(off, off + n), f.name, np.arange(n)))
            off += n
        return Step("concat")

    def _slice(self, var, value) -> Step:
        src = value.args[0]
        ax = self.axis[src.name]
        if op_name(value) == "split":
            return Step("skip") if int(value.attrs.axis) % len(static_shape(src)) == ax \
                else Step("whole")
        axes = [int(a) for a in value.args[1].fields]
        rank = len(static_shape(src))
        if ax not in [a % rank for a in axes]:
            return self._keep(var, src, ax)
        if len(axes) != 1:
            return Step("whole")
        c = self.channels[src.name]
        begin, end = int(value.args[2].fields[0]), int(value.args[3].fields[0])
        stride = int(value.args[4].fields[0]) if len(value.args) > 4 else 1
        index = np.arange(c)[slice(begin, end, stride)]
        return self._sliced(var, src, index)

    def _sliced(self, var, src, index) -> Step:
        if len(index) == 0 or static_shape(var)[self.axis[src.name]] != len(index):
            return Step("whole")
        self._part(var, self.axis[src.name])
        self.relations.append((var.name, np.arange(len(index)), src.name, index))
        return Step("slice", src.name, index)

    def _tuple_item(self, var, item) -> Step:
        tup = item.tuple_value
        split = self.bindings.get(tup.name) if isinstance(tup, relax.Var) else None
        if split is None or self.steps.get(tup.name, Step("whole")).kind != "skip" \
                or op_name(split.value) != "split":
            return Step("whole")
        src = split.value.args[0]
        c = self.channels[src.name]
        sections = split.value.attrs.indices_or_sections
        if isinstance(sections, tvm.tirx.IntImm | int):
            n = int(sections)
            edges = [i * c // n for i in range(n + 1)]
        else:
            edges = [0, *[int(s) for s in sections], c]
        i = int(item.index)
        return self._sliced(var, src, np.arange(edges[i], edges[i + 1]))

    def _layer_norm(self, var, value) -> Step:
        src = value.args[0]
        rank = len(static_shape(src))
        axes = [int(a) % rank for a in value.attrs.axes]
        ax = self.axis[src.name]
        if ax not in axes:
            return self._keep(var, src, ax)
        if axes != [ax] or not all(isinstance(a, tvm.ir.GenericConst) for a in value.args[1:]):
            return Step("whole")
        step = self._keep(var, src, ax)
        return Step("layer_norm", src.name) if step.kind == "same" else step

    def _group_norm(self, var, value) -> Step:
        src = value.args[0]
        a = value.attrs
        ax = self.axis[src.name]
        groups = int(a.num_groups)
        if int(a.channel_axis) % len(static_shape(src)) != ax or groups < self.k:
            return Step("whole")
        step = self._keep(var, src, ax)
        if step.kind != "same":
            return step
        per = self.channels[src.name] // groups
        for g in range(groups):
            self.atoms.append([(var.name, np.arange(g * per, (g + 1) * per))])
        return Step("group_norm", src.name)


def unique_names(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every binding of ``main`` named apart (the torch importer may bind two
    tensors to one name; plans and device maps name tensors): a repeated name ``v`` becomes
    ``v_2``, ``v_3``, ... Returns ``mod`` itself when the names are already unique."""
    block = main_block(mod)
    names = [b.var.name for b in block.bindings]
    if len(set(names)) == len(names):
        return mod
    func = mod["main"]
    taken = set(names) | {p.name for p in func.params}
    seen: set[str] = set()
    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, p.ty) for p in func.params]
    vmap: dict[relax.Var, relax.Expr] = dict(zip(func.params, params, strict=True))
    outputs = set(output_vars(func))
    with bb.function("main", params, attrs=dict(func.attrs.items()) if func.attrs else {}):
        with bb.dataflow():
            for b in block.bindings:
                name, n = b.var.name, 1
                while name in seen:
                    n += 1
                    name = f"{b.var.name}_{n}"
                    if name in taken and name not in seen and n > 1:
                        continue
                seen.add(name)
                value = bb.normalize(substitute(b.value, vmap))
                var = (relax.Var if b.var in outputs else relax.DataflowVar)(name, value.ty)
                bb.emit_normalized(relax.VarBinding(var, value))
                vmap[b.var] = var
        results = [vmap[v] for v in output_vars(func)]
        bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
    return copy_helpers(mod, bb.get())


def _is_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def _dense_op(call) -> str | None:
    """``"nn.conv2d"`` / ``"matmul"`` for a convolution (NCHW, OIHW) or a matmul with a
    constant 2-D weight, else None."""
    name = op_name(call)
    if name == "nn.conv2d" and isinstance(call.args[1], tvm.ir.GenericConst) \
            and call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW" \
            and (call.attrs.out_layout in ("NCHW", "", None)):
        return name
    if name == "matmul" and isinstance(call.args[1], tvm.ir.GenericConst) \
            and len(static_shape(call.args[1])) == 2:
        return name
    return None


def _nbytes(var) -> int:
    return tensor_ref(var).nbytes


# -- classes, atoms, partition -----------------------------------------------------------------
def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes under the edges ``a[i] -- b[i]``: each node's
    smallest member (label propagation with pointer jumping)."""
    label = np.arange(n)
    if not len(a):
        return label
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, label):
            return label
        label = new


@dataclass
class Analysis:
    """The structure of one module, its classes and atoms, and their partition into ``k``
    branches (see the module docstring)."""

    k: int
    structure: Structure
    offset: dict[str, int]                  # partitioned tensor -> its first node id
    atom: np.ndarray                        # node -> atom id
    branch: np.ndarray                      # atom -> branch
    perms: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[Layer]:
        return list(self.structure.layers.values())

    def branches(self, var: str) -> np.ndarray:
        """Branch of each channel of partitioned tensor ``var``."""
        o = self.offset[var]
        return self.branch[self.atom[o:o + self.structure.channels[var]]]

    def candidates(self) -> list[str]:
        """Bindings that may be cut (dense layers between partitioned tensors, each branch
        holding input channels exactly where it holds output channels; layer norms over
        channels), in order."""
        st, out = self.structure, []
        for name, step in st.steps.items():
            if step.kind == "dense" and st.parts(step.src):
                have_in = np.bincount(self.branches(step.src), minlength=self.k) > 0
                have_out = np.bincount(self.branches(name), minlength=self.k) > 0
                if np.array_equal(have_in, have_out):
                    out.append(name)
            elif step.kind == "layer_norm":
                out.append(name)
        return out


def channel_axes(mod: tvm.IRModule, k: int) -> dict[str, int]:
    """The partitioned tensors of ``main`` (``k`` branches) and their channel axes: whose
    channel samples :func:`analyse` reads."""
    return dict(Structure(mod, k).axis)


def analyse(mod: tvm.IRModule, k: int, refine_rounds: int = 4,
            samples: dict[str, np.ndarray] | None = None) -> Analysis:
    """Structure, classes, atoms and the knowledge partition of ``main`` into ``k`` branches.

    ``samples``: variable name -> its channel vectors on calibration data (``[rows, C]``, one
    row per example and position; :meth:`~splitc.backend.torch_program.TorchProgram.
    channel_samples` of :func:`channel_axes`), for the co-firing edges; any subset of the
    variables."""
    if k < 2:
        raise SplitcError("a branch split needs at least 2 branches (devices)")
    st = Structure(mod, k)
    offset, n = {}, 0
    for v, c in st.channels.items():
        offset[v] = n
        n += c

    def ids(var, idx):
        return offset[var] + np.asarray(idx, dtype=np.int64)

    pairs = [(ids(a, ia), ids(b, ib)) for a, ia, b, ib in st.relations]
    ea = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    eb = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
    cls = _components(n, ea, eb)
    aa, ab = [], []
    for members in st.atoms:
        nodes = np.concatenate([ids(v, i) for v, i in members])
        aa.append(np.repeat(nodes[0], len(nodes)))
        ab.append(nodes)
    atom_label = _components(n, np.concatenate([cls, *aa]) if aa else cls,
                             np.concatenate([np.arange(n), *ab]) if ab else np.arange(n))
    roots, atom = np.unique(atom_label, return_inverse=True)
    n_atoms = len(roots)
    # the contiguous partition, tensor by tensor in order: a tensor's atoms not placed yet
    # fill, in channel order, the branches that hold fewer than C/K of its channels
    branch = np.full(n_atoms, -1)
    for v, c in st.channels.items():
        a = atom[offset[v]:offset[v] + c]
        if not (branch[a] < 0).any():
            continue
        held = np.bincount(branch[a][branch[a] >= 0], minlength=k).astype(float)
        size = dict(zip(*np.unique(a, return_counts=True), strict=True))
        for i in range(c):
            if branch[a[i]] < 0:
                g = int(np.argmax(np.minimum(c / k - held, 1e9) - np.arange(k) * 1e-6))
                branch[a[i]] = g
                held[g] += size[a[i]]
    ana = Analysis(k, st, offset, atom, branch)
    _refine(ana, refine_rounds, samples or {})
    return ana


def _refine(ana: Analysis, rounds: int, samples: dict[str, np.ndarray]) -> None:
    """Balanced swaps of interchangeable atoms that raise the affinity inside branches."""
    st, k = ana.structure, ana.k
    n = len(ana.branch)
    rows, cols, vals = [], [], []

    def atoms_of(var):
        o = ana.offset[var]
        return ana.atom[o:o + st.channels[var]]

    for lay in st.layers.values():
        if lay.groups != 1 or not st.parts(lay.src):
            continue
        if lay.op == "matmul":
            mass = np.abs(lay.weight).T
        else:
            mass = np.abs(lay.weight).sum(axis=(2, 3))  # [out, in]
        mass = mass / (mass.sum() or 1.0)
        src, dst = atoms_of(lay.src), atoms_of(lay.dst)
        rows.append(np.repeat(dst, len(src)))
        cols.append(np.tile(src, len(dst)))
        vals.append(mass.reshape(-1))
    for var, corr in _cofiring(ana, samples).items():
        ids = atoms_of(var)
        rows.append(np.repeat(ids, len(ids)))
        cols.append(np.tile(ids, len(ids)))
        vals.append(corr.reshape(-1) / 2)
    if not rows:
        return
    sparse = optional.scipy_sparse()
    aff = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                   np.concatenate(cols))), shape=(n, n))
    aff = (aff + aff.T).tocsc()
    aff.setdiag(0.0)
    aff.eliminate_zeros()
    # atoms are interchangeable when they hold as many channels of each tensor
    sig: dict[int, list] = {}
    for v in st.channels:
        a = atoms_of(v)
        for i, cnt in zip(*np.unique(a, return_counts=True), strict=True):
            sig.setdefault(int(i), []).append((v, int(cnt)))
    classes: dict[tuple, list[int]] = {}
    for i, s in sig.items():
        classes.setdefault(tuple(s), []).append(i)
    branch = ana.branch
    d = np.asarray(aff @ np.eye(k)[branch])  # d[a, g]: affinity of atom a to branch g
    for _ in range(rounds):
        improved = False
        for idx in classes.values():
            if len(idx) < 2 or len(idx) > MAX_CLASS:
                continue
            idx = np.array(idx)
            sub = aff[:, idx][idx].toarray()  # columns first: CSC slices them fast
            for _swap in range(min(len(idx), MAX_SWAPS)):
                ia, ib, best = _best_swap(d[idx], branch[idx], sub, k)
                if not best > 1e-12:
                    break
                a, b = idx[ia], idx[ib]
                ga, gb = branch[a], branch[b]
                delta = (aff[:, [b]] - aff[:, [a]]).toarray().ravel()
                d[:, ga] += delta
                d[:, gb] -= delta
                branch[a], branch[b] = gb, ga
                improved = True
        if not improved:
            break


def _swap_gains(dd: np.ndarray, p: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """``gain[i, j]``: the affinity inside branches gained by swapping atoms ``i`` and ``j``
    (``dd[i, g]``: atom ``i``'s affinity to branch ``g``; ``p``: their branches; ``sub``: the
    affinity between them); ``-inf`` where both are in one branch."""
    gain = dd[:, p] - dd[np.arange(len(p)), p][:, None] + dd[:, p].T \
        - dd[np.arange(len(p)), p][None, :] - 2 * sub
    gain[p[:, None] == p[None, :]] = -np.inf
    return gain


def _best_swap(dd: np.ndarray, p: np.ndarray, sub: np.ndarray, k: int,
               top: int = SWAP_TOP) -> tuple[int, int, float]:
    """The swap :func:`_swap_gains` rates highest (the first in row-major order on ties),
    without building the ``n x n`` matrix when it need not: affinities are non-negative, so
    swapping ``i`` (branch g) with ``j`` (branch h) gains at most ``u_i + v_j`` (their gains
    in affinity to the other branch, ``sub`` ignored). Only the ``top`` atoms of each branch
    by ``u`` or ``v``, for each pair of branches, are rated exactly; when the best of them beats
    every bound on the rest, it is the answer; otherwise the full matrix decides."""
    def full() -> tuple[int, int, float]:
        gain = _swap_gains(dd, p, sub)
        ia, ib = np.unravel_index(np.argmax(gain), gain.shape)
        return int(ia), int(ib), float(gain[ia, ib])

    if len(p) <= 4 * top:
        return full()
    members = [np.flatnonzero(p == g) for g in range(k)]
    picked, bounds = [], []
    for g in range(k):
        for h in range(g + 1, k):
            ig, jh = members[g], members[h]
            if not len(ig) or not len(jh):
                continue
            u = dd[ig, h] - dd[ig, g]
            v = dd[jh, g] - dd[jh, h]
            ou, ov = np.argsort(-u, kind="stable"), np.argsort(-v, kind="stable")
            picked += [ig[ou[:top]], jh[ov[:top]]]
            rest_u = u[ou[top]] if len(u) > top else -np.inf
            rest_v = v[ov[top]] if len(v) > top else -np.inf
            bounds.append(max(rest_u + v[ov[0]], u[ou[0]] + rest_v))
    if not picked:
        return 0, 0, -np.inf
    s = np.unique(np.concatenate(picked))
    gain = _swap_gains(dd[s], p[s], sub[np.ix_(s, s)])
    ia, ib = np.unravel_index(np.argmax(gain), gain.shape)
    best = float(gain[ia, ib])
    slack = 1e-9 * (1.0 + float(np.abs(dd).max()))
    if bounds and best <= max(bounds) + slack:
        return full()
    return int(s[ia]), int(s[ib]), best


def _cofiring(ana: Analysis, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per partitioned tensor with calibration samples: |correlation| between its channels
    over examples and positions, normalised to total 1 (diagonal zero)."""
    st = ana.structure
    out = {}
    for var, a in samples.items():
        if not st.parts(var):
            continue
        if a.ndim != 2 or a.shape[1] != st.channels[var] or st.channels[var] > MAX_CLASS:
            continue
        data = a.astype(np.float64)
        std = data.std(axis=0)
        live = std > 1e-12
        corr = np.zeros((data.shape[1], data.shape[1]))
        if live.sum() > 1:
            corr[np.ix_(live, live)] = np.abs(np.corrcoef(data[:, live], rowvar=False))
        np.fill_diagonal(corr, 0.0)
        if corr.sum() > 0:
            out[var] = corr / corr.sum()
    return out


# -- policy --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A branch candidate priced for the transmission policy."""

    layer: str
    input: str
    gather_bytes: int      # bytes keeping it a sync point sends per inference
    dropped_mass: float    # fraction of the layer's |W| outside the diagonal blocks (a layer
    #                        norm: 0, what it changes is the statistics)


def sync_candidates(ana: Analysis) -> list[Candidate]:
    """Every branch candidate with what keeping it a sync point costs and cutting it loses."""
    st, k, out = ana.structure, ana.k, []
    for name in ana.candidates():
        step = st.steps[name]
        src = st.bindings[name].value.args[0]
        if step.kind == "layer_norm":
            positions = int(np.prod(static_shape(src))) // st.channels[step.src]
            nbytes = k * (k - 1) * 2 * positions * 4
            out.append(Candidate(name, step.src, nbytes, 0.0))
            continue
        lay = st.layers[name]
        bi, bo = ana.branches(lay.src), ana.branches(lay.dst)
        w = np.abs(lay.weight).T if lay.op == "matmul" else np.abs(lay.weight).sum(axis=(2, 3))
        keep = bo[:, None] == bi[None, :]
        total = w.sum() or 1.0
        per_branch = np.bincount(bi, minlength=k) / len(bi)
        # each branch receives the other branches' channels of the input
        nbytes = int(round(sum(lay.in_bytes * (1 - f) for f in per_branch if f > 0)))
        out.append(Candidate(name, lay.src, nbytes, float(w[~keep].sum() / total)))
    return out


def choose_sync(ana: Analysis, max_dropped: float) -> frozenset[str]:
    """A transmission policy: cut the candidates that save the most bytes per unit of weight
    mass dropped, while the mass dropped (summed over cut layers, each layer's total 1, as a
    fraction of all candidates) stays within ``max_dropped``; the rest stay sync points.
    ``max_dropped=0`` keeps every sync point (exact), ``1`` cuts them all."""
    cands = sync_candidates(ana)
    if not cands:
        return frozenset()
    order = sorted(cands, key=lambda c: -c.gather_bytes / max(c.dropped_mass, 1e-9))
    budget, spent, cut = max_dropped * len(cands), 0.0, set()
    for c in order:
        if c.dropped_mass == 0.0 and max_dropped <= 0:
            continue
        if spent + c.dropped_mass <= budget + 1e-12:
            spent += c.dropped_mass
            cut.add(c.layer)
    return frozenset(c.layer for c in cands if c.layer not in cut)


def keep_where_cuts_hurt(ana: Analysis, loss: Mapping[str, float], limit: int
                         ) -> frozenset[str]:
    """A transmission policy from measured damage: keep as sync points the candidates whose
    cut loses most per byte that keeping them sends (``loss`` by layer: the error a cut layer
    leaves against the original's channels, :func:`splitc.planning.distill.cut_losses`; a
    candidate not in it counts its dropped weight mass), while the bytes stay within
    ``limit`` (greedy, by loss per byte)."""
    cands = sync_candidates(ana)
    order = sorted(cands, key=lambda c: -loss.get(c.layer, c.dropped_mass)
                   / max(c.gather_bytes, 1))
    keep, spent = [], 0
    for c in order:
        if spent + c.gather_bytes <= limit:
            keep.append(c.layer)
            spent += c.gather_bytes
    return frozenset(keep)


@dataclass(frozen=True)
class BranchPlan:
    """What :class:`BranchRewrite` applies: K, the branch of every channel of every
    partitioned tensor (by name), and which candidates are cut into branches."""

    k: int
    branches: Mapping[str, tuple[int, ...]]
    branched: frozenset[str]

    def to_json(self) -> str:
        return json.dumps({"k": self.k, "branched": sorted(self.branched),
                           "branches": {v: "".join(map(str, b)) if self.k <= 10 else list(b)
                                        for v, b in self.branches.items()}})

    @classmethod
    def from_json(cls, text: str) -> BranchPlan:
        try:
            d = json.loads(text)
            branches = {v: tuple(int(c) for c in b) for v, b in d["branches"].items()}
            return cls(int(d["k"]), branches, frozenset(d["branched"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SplitcError(f"not a branch plan ({type(e).__name__}: {e}); compile again "
                              "with --strategy branch") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, BranchPlan) and (self.k, dict(self.branches), self.branched) \
            == (other.k, dict(other.branches), other.branched)

    def __hash__(self) -> int:
        return hash((self.k, self.branched))


def plan_branches(mod: tvm.IRModule, k: int, sync: frozenset[str] | str | float = "all",
                  analysis: Analysis | None = None) -> BranchPlan:
    """The branch plan of ``mod`` for ``k`` devices. ``sync``: the candidates kept as sync
    points (a set of names), ``"all"`` (exact), ``"none"``, or a float: the weight-mass
    budget for :func:`choose_sync`."""
    ana = analysis or analyse(mod, k)
    names = set(ana.candidates())
    if sync == "all":
        keep = names
    elif sync == "none":
        keep = set()
    elif isinstance(sync, float | int) and not isinstance(sync, bool):
        keep = set(choose_sync(ana, float(sync)))
    else:
        keep = set(sync)
        unknown = keep - names
        if unknown:
            raise SplitcError(f"not branch candidates: {', '.join(sorted(unknown))} "
                              f"(candidates: {', '.join(sorted(names)) or 'none'})")
    branches = {v: tuple(int(b) for b in ana.branches(v)) for v in ana.structure.channels}
    return BranchPlan(k, branches, frozenset(names - keep))


@dataclass(frozen=True)
class Hint:
    """A tensor of the branch model that has a counterpart in the original: ``part`` holds
    the channels ``channels`` (along ``axis``) of the original's ``original``."""

    part: str
    original: str
    channels: np.ndarray
    axis: int


def hints(plan: BranchPlan, ana: Analysis, names, cut_only: bool = True) -> list[Hint]:
    """The branch parts (``{var}_b{g}``, as :class:`BranchRewrite` names them) among ``names``
    (the branch model's variables) of the outputs of cut layers (``cut_only``), or of every
    partitioned tensor: what distillation can match to the original layer by layer."""
    names, out = set(names), []
    for var, branches in plan.branches.items():
        if cut_only and var not in plan.branched:
            continue
        b = np.asarray(branches)
        for g in range(plan.k):
            part = f"{var}_b{g}"
            if part in names and (b == g).any():
                out.append(Hint(part, var, np.flatnonzero(b == g), ana.structure.axis[var]))
    return out


# -- rewrite -----------------------------------------------------------------------------------
@dataclass
class _Parts:
    axis: int
    chans: list[np.ndarray]           # per branch: original channel indices, increasing
    vars: list[relax.Var | None]      # per branch: the part (None: no channel there)


@dataclass
class _Whole:
    var: relax.Var
    device: int | None                # None: a model input, on every device


class _Rewriter:
    """Emits the branch model of one plan and records each binding's device."""

    def __init__(self, mod: tvm.IRModule, plan: BranchPlan):
        self.plan, self.k = plan, plan.k
        self.st = Structure(mod, plan.k)
        self.mod = self.st.mod
        missing = set(self.st.channels) - set(plan.branches)
        if missing:
            raise SplitcError(f"the branch plan does not fit this model: no branches for "
                              f"{', '.join(sorted(missing)[:5])} (compile again)")
        self.bb = relax.BlockBuilder()
        self.state: dict[str, _Parts | _Whole] = {}
        self.device_of: dict[str, int] = {}
        self.cache: dict[tuple, relax.Var] = {}

    # -- helpers --------------------------------------------------------------------------
    def fresh(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``, ... when it is taken."""
        n, out = 1, name
        while out in self.device_of or out in self.st.bindings:
            n += 1
            out = f"{name}_{n}"
        return out

    def emit(self, value, name: str, device: int) -> relax.Var:
        name = self.fresh(name) if name in self.device_of else name
        var = self.bb.emit(value, name_hint=name)
        self.device_of[name] = device
        return var

    def chans(self, var: str) -> list[np.ndarray]:
        b = np.array(self.plan.branches[var])
        return [np.flatnonzero(b == g) for g in range(self.k)]

    def full_on(self, name: str, device: int, restore: bool = True) -> relax.Var:
        """The whole tensor on ``device``: a partitioned one is gathered there (its channels
        back in their original order unless ``restore`` is False: then in branch order)."""
        s = self.state[name]
        if isinstance(s, _Whole):
            return s.var
        key = ("full", name, device, restore)
        if key not in self.cache:
            live = [v for v in s.vars if v is not None]
            cat = live[0] if len(live) == 1 else self.emit(
                relax.op.concat(live, axis=s.axis), f"{name}_g{device}", device)
            order = np.concatenate(s.chans)
            if restore and not np.array_equal(order, np.arange(len(order))):
                cat = self.emit(relax.op.take(cat, _const(np.argsort(order).astype("int64")),
                                              axis=s.axis, mode="fast"),
                                f"{name}_o{device}", device)
            self.cache[key] = cat
        return self.cache[key]

    def gathered_order(self, name: str) -> np.ndarray:
        s = self.state[name]
        return np.concatenate(s.chans) if isinstance(s, _Parts) else \
            np.arange(static_shape(s.var)[1])

    def pick(self, name: str, idx: np.ndarray, g: int, axis: int) -> relax.Var:
        """Channels ``idx`` (original indices) of tensor ``name`` for branch ``g``: from its
        own part when partitioned, else sliced from the whole tensor where it lies."""
        s = self.state[name]
        if isinstance(s, _Parts):
            pos = np.searchsorted(s.chans[g], idx)
            if s.vars[g] is not None and np.all(pos < len(s.chans[g])) \
                    and np.array_equal(s.chans[g][np.minimum(pos, len(s.chans[g]) - 1)], idx):
                return self._select(s.vars[g], pos, s.axis, f"{name}_p{g}", g,
                                    len(s.chans[g]))
            # (not held by branch g: never for a consistent plan, but exact all the same)
            return self._select(self.full_on(name, g), idx, s.axis, f"{name}_x{g}", g,
                                self.st.channels[name])
        key = ("pick", name, g, tuple(idx.tolist()))
        if key not in self.cache:
            dev = g if s.device is None else s.device
            self.cache[key] = self._select(s.var, idx, axis, f"{name}_s{g}", dev,
                                           static_shape(s.var)[axis])
        return self.cache[key]

    def _select(self, var, pos, axis, name, device, size) -> relax.Var:
        if len(pos) == size and np.array_equal(pos, np.arange(size)):
            return var
        key = ("sel", var.name, tuple(pos.tolist()), axis)
        if key in self.cache:
            return self.cache[key]
        if len(pos) and np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
            value = relax.op.strided_slice(var, axes=[axis], begin=[int(pos[0])],
                                           end=[int(pos[0]) + len(pos)])
        else:
            value = relax.op.take(var, _const(pos.astype("int64")), axis=axis, mode="fast")
        out = self.emit(value, self.fresh(name), device)
        self.cache[key] = out
        return out

    # -- bindings -------------------------------------------------------------------------
    def rewrite(self, b: relax.VarBinding) -> None:
        name = b.var.name
        step = self.st.steps[name]
        if step.kind == "skip":
            return
        handler = getattr(self, f"_{step.kind}")
        if step.kind != "whole" and not self.st.parts(name):
            handler = self._whole
        self.state[name] = handler(b, step)

    def _whole(self, b, _step) -> _Whole:
        value = b.value
        vmap = {v: self.full_on(v.name, 0) for v in var_inputs(value) if v.name in self.state}
        return _Whole(self.emit(substitute(value, vmap), b.var.name, 0), 0)

    def _parts(self, b, build) -> _Parts:
        name = b.var.name
        chans = self.chans(name)
        out = []
        for g in range(self.k):
            if len(chans[g]) == 0:
                out.append(None)
                continue
            value = build(g, chans[g])
            out.append(value if isinstance(value, relax.Var)
                       else self.emit(value, self.fresh(f"{name}_b{g}"), g))
        return _Parts(self.st.axis[name], chans, out)

    def _operand(self, a, g, chans, out_axis, out_rank):
        """Operand ``a`` of an element-wise op, for branch ``g`` holding ``chans``."""
        if isinstance(a, tvm.ir.GenericConst):
            arr = const_array(a)
            ax = out_axis - (out_rank - arr.ndim)
            if ax >= 0 and arr.shape[ax] > 1:
                return _const(np.ascontiguousarray(np.take(arr, chans, axis=ax)))
            return a
        if not isinstance(a, relax.Var) or a.name not in self.state:
            return a
        shape = static_shape(a)
        ax = out_axis - (out_rank - len(shape))
        s = self.state[a.name]
        if isinstance(s, _Parts):
            if s.axis == ax and shape[ax] != 1:
                return self.pick(a.name, chans, g, ax)
            return self.full_on(a.name, g)
        if ax >= 0 and shape[ax] > 1:
            return self.pick(a.name, chans, g, ax)
        return s.var

    def _same(self, b, step) -> _Parts:
        call, name = b.value, b.var.name
        axis = self.st.axis[name]
        rank = len(static_shape(b.var))
        op = op_name(call)

        def build(g, chans):
            if op in BINARY_ELEMENTWISE:
                args = [self._operand(a, g, chans, axis, rank) for a in call.args]
            else:  # reads one tensor (its channel axis may sit elsewhere)
                args = [self.pick(step.src, step.source(chans), g, self.st.axis[step.src]),
                        *call.args[1:]]
            if op in ("reshape", "flatten"):
                shape = list(static_shape(b.var))
                shape[axis] = len(chans)
                return relax.op.reshape(args[0], shape)
            return relax.Call(call.op, args, call.attrs)

        return self._parts(b, build)

    def _dense(self, b, step) -> _Parts:
        call, name = b.value, b.var.name
        w = const_array(call.args[1])
        src = step.src
        cut = name in self.plan.branched and isinstance(self.state[src], _Parts)
        op = op_name(call)

        def build(g, out_c):
            if cut:
                x = self.state[src].vars[g]
                cols = self.state[src].chans[g]
            elif isinstance(self.state[src], _Parts):
                x = self.full_on(src, g, restore=False)
                cols = self.gathered_order(src)
            else:
                x = self.full_on(src, g)
                cols = None
            if op == "matmul":
                wk = w[:, out_c] if cols is None else w[cols][:, out_c]
                return relax.op.matmul(x, _const(np.ascontiguousarray(wk)),
                                       out_dtype=call.attrs.out_dtype)
            wk = w[out_c] if cols is None else w[out_c][:, cols]
            return _conv(call, x, wk, 1)

        return self._parts(b, build)

    def _grouped(self, b, step) -> _Parts | _Whole:
        call, name = b.value, b.var.name
        w = const_array(call.args[1])
        groups = int(call.attrs.groups)
        c_in = static_shape(call.args[0])[1]
        per_in, per_out = c_in // groups, w.shape[0] // groups
        src = step.src
        chans = self.chans(name)
        for g in range(self.k):  # each part must hold whole groups
            grp = np.unique(chans[g] // per_out)
            if len(grp) * per_out != len(chans[g]):
                return self._whole(b, step)

        def build(g, out_c):
            grp = np.unique(out_c // per_out)
            in_c = (grp[:, None] * per_in + np.arange(per_in)[None, :]).reshape(-1)
            x = self.pick(src, in_c, g, 1)
            return _conv(call, x, w[out_c], len(grp))

        return self._parts(b, build)

    def _concat(self, b, _step) -> _Parts:
        call = b.value
        axis = self.st.axis[b.var.name]

        def build(g, chans):
            parts, off = [], 0
            for f in call.args[0].fields:
                n = self.st.channels[f.name]
                mine = chans[(chans >= off) & (chans < off + n)] - off
                if len(mine):
                    parts.append(self.pick(f.name, mine, g, axis))
                off += n
            return parts[0] if len(parts) == 1 else relax.op.concat(parts, axis=axis)

        return self._parts(b, build)

    def _slice(self, b, step) -> _Parts:
        axis = self.st.axis[b.var.name]
        return self._parts(b, lambda g, chans: self.pick(step.src, step.index[chans], g, axis))

    _shuffle = _slice

    def _layer_norm(self, b, step) -> _Parts:
        call, name = b.value, b.var.name
        a = call.attrs
        gamma, beta = const_array(call.args[1]), const_array(call.args[2])
        src = self.state[step.src]
        if not isinstance(src, _Parts):
            return self._whole(b, step)
        axis = src.axis
        eps = float(a.epsilon)
        if name in self.plan.branched:
            return self._parts(b, lambda g, chans: relax.op.nn.layer_norm(
                src.vars[g], _const(gamma[chans]), _const(beta[chans]), axes=[axis],
                epsilon=eps, center=bool(a.center), scale=bool(a.scale)))
        # exact: each branch's (mean, sum of squared deviations) per position, combined
        n = {g: len(src.chans[g]) for g in range(self.k) if src.vars[g] is not None}
        total = sum(n.values())
        shape = [1] * len(static_shape(b.var))
        stats, dev = {}, {}
        for g in n:
            x = src.vars[g]
            m = self.emit(relax.op.mean(x, axis=[axis], keepdims=True), f"{name}_m{g}", g)
            dev[g] = self.emit(relax.op.subtract(x, m), f"{name}_d{g}", g)
            sq = self.emit(relax.op.multiply(dev[g], dev[g]), f"{name}_sq{g}", g)
            q = self.emit(relax.op.sum(sq, axis=[axis], keepdims=True), f"{name}_q{g}", g)
            stats[g] = self.emit(relax.op.concat([m, q], axis=axis), f"{name}_st{g}", g)

        def const(v):
            return _const(np.float32(v))

        def build(g, chans):
            e = lambda value, what: self.emit(value, f"{name}_{what}{g}", g)  # noqa: E731
            ms, qs, mean = {}, {}, None
            for h in n:
                ms[h] = e(relax.op.strided_slice(stats[h], axes=[axis], begin=[0], end=[1]),
                          f"m{h}at")
                qs[h] = e(relax.op.strided_slice(stats[h], axes=[axis], begin=[1], end=[2]),
                          f"q{h}at")
                term = e(relax.op.multiply(ms[h], const(n[h] / total)), f"wm{h}at")
                mean = term if mean is None else e(relax.op.add(mean, term), f"mean{h}at")
            m2 = None
            for h in n:
                dm = e(relax.op.subtract(ms[h], mean), f"dm{h}at")
                dm2 = e(relax.op.multiply(dm, dm), f"dm2{h}at")
                term = e(relax.op.add(qs[h], e(relax.op.multiply(dm2, const(n[h])),
                                                f"ndm2{h}at")), f"t{h}at")
                m2 = term if m2 is None else e(relax.op.add(m2, term), f"m2{h}at")
            var = e(relax.op.divide(m2, const(total)), "var")
            std = e(relax.op.sqrt(e(relax.op.add(var, const(eps)), "veps")), "std")
            # x - mean = (x - m_g) + (m_g - mean)
            centred = e(relax.op.add(dev[g], e(relax.op.subtract(ms[g], mean), "shift")), "c")
            y = e(relax.op.divide(centred, std), "n")
            shape[axis] = len(chans)
            if bool(a.scale):
                y = e(relax.op.multiply(y, _const(gamma[chans].reshape(shape))), "sc")
            if bool(a.center):
                y = relax.op.add(y, _const(beta[chans].reshape(shape)))
            return y

        return self._parts(b, build)

    def _group_norm(self, b, step) -> _Parts | _Whole:
        call, name = b.value, b.var.name
        a = call.attrs
        per = self.st.channels[name] // int(a.num_groups)
        chans = self.chans(name)
        for g in range(self.k):
            if len(np.unique(chans[g] // per)) * per != len(chans[g]):
                return self._whole(b, step)
        gamma, beta = const_array(call.args[1]), const_array(call.args[2])
        return self._parts(b, lambda g, c: relax.op.nn.group_norm(
            self.pick(step.src, c, g, self.st.axis[name]), _const(gamma[c]),
            _const(beta[c]),
            num_groups=len(c) // per, channel_axis=int(a.channel_axis),
            axes=[int(x) for x in a.axes], epsilon=float(a.epsilon), center=bool(a.center),
            scale=bool(a.scale)))

    # -- the whole function ---------------------------------------------------------------
    def run(self) -> tvm.IRModule:
        func = self.mod["main"]
        params = [relax.Var(p.name, p.ty) for p in func.params]
        attrs = dict(func.attrs.items()) if func.attrs else {}
        with self.bb.function("main", params, attrs=attrs):
            for p in params:
                self.state[p.name] = _Whole(p, None)
            with self.bb.dataflow():
                for b in self.st.block.bindings:
                    self.rewrite(b)
                results = []
                for v in self.st.outputs:
                    full = self.full_on(v, 0)
                    out = self.bb.emit_output(full, name_hint=f"{v}_out")
                    self.device_of[out.name] = 0
                    results.append(out)
            self.bb.emit_func_output(results[0] if len(results) == 1 else relax.Tuple(results))
        return copy_helpers(self.mod, self.bb.get())


def _const(value) -> relax.Constant:
    """A Relax constant of exactly this array's dtype (``relax.const`` makes int64 int32)."""
    arr = np.ascontiguousarray(value)
    return relax.const(arr, str(arr.dtype))


def _conv(call, x, w, groups):
    a = call.attrs
    return relax.op.nn.conv2d(x, _const(np.ascontiguousarray(w)), strides=a.strides,
                              padding=a.padding, dilation=a.dilation, groups=groups,
                              data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                              out_layout=a.out_layout, out_dtype=a.out_dtype)


def branch_model(mod: tvm.IRModule, plan: BranchPlan) -> tuple[tvm.IRModule, dict[str, int]]:
    """The branch model of ``plan`` over ``mod`` and the device of each of its bindings."""
    rw = _Rewriter(mod, plan)
    out = rw.run()
    return out, rw.device_of


def branch_devices(mod: tvm.IRModule, plan: BranchPlan) -> dict[str, int]:
    """Which device computes each binding of the branch model (branch k on device k, whole
    ops on device 0); the names are those :class:`BranchRewrite` gives."""
    return branch_model(mod, plan)[1]


@tvm.transform.module_pass(opt_level=0, name="splitc.BranchRewrite")
class BranchRewrite:
    """Apply a :class:`BranchPlan` to ``main``: the branch model (see the module docstring).

    Parameters
    ----------
    plan : BranchPlan
        The branch of every channel and the candidates cut.
    """

    def __init__(self, plan: BranchPlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return branch_model(mod, self.plan)[0]


@tvm.transform.module_pass(opt_level=0, name="splitc.BranchSplit")
class BranchSplit:
    """Outline a branch model into per-device pieces (branch k on device k).

    Parameters
    ----------
    device_of : Mapping[str, int]
        :func:`branch_devices` of the plan the branch model was made with.
    """

    def __init__(self, device_of: Mapping[str, int]):
        self.device_of = dict(device_of)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return OutlinePieces(self.device_of)(mod)


__all__ = ["Analysis", "BranchPlan", "BranchRewrite", "BranchSplit", "Candidate", "Structure",
           "analyse", "branch_devices", "branch_model", "choose_sync", "plan_branches",
           "sync_candidates"]
