"""Branch rewrite: a CNN turned into K nearly independent branches, one per device, that
exchange activations only at a few chosen *sync points* (NoNN's knowledge partitioning and
separable ResNeXt's transmission policy, as a compiler pass that works on any imported CNN).

Analysis (:func:`analyse`, :func:`plan_branches`):

1. **Channel spaces.** Tensors whose channels correspond one to one — the input and output of
   a relu, a pool, a per-channel bias or batch norm, both operands of a residual add, a
   channel-preserving reshape — share a *space* (union-find over ``main``'s variables). A
   permutation of a space's channels, applied to every producer's output channels and every
   consumer's input channels, leaves the model's function unchanged. Spaces touching the
   model's inputs or outputs, or an op this pass does not know, keep their order ("fixed").
2. **Atoms.** A grouped convolution ties each input group to its output group: those channels
   must land in the same branch. Channels so tied form an *atom* (union-find over channels).
3. **Knowledge partitioning.** Every space is cut into K equal branches (channel ``c`` of a
   fixed space into branch ``c * K // C``). Free atoms are then moved between branches by
   balanced swaps (Kernighan–Lin style: two atoms of the same size in each space trade
   branches when that raises the weight mass inside branches) over the graph whose edges are
   the dense layers' weights ``|W[o, i]|`` (each layer normalised to total 1) and, given
   activations on calibration data, how strongly two channels of a space fire together
   (``|corr|``, NoNN's co-firing, each space normalised to total 1).
4. **Transmission policy.** A dense 1x1/kxk convolution between two partitioned spaces is a
   *branch candidate*: made block-diagonal (a grouped conv with K groups: each branch reads
   only its own channels) it needs no exchange; kept dense it is a *sync point* (an
   all-gather of its input). :func:`sync_candidates` prices each candidate: bytes saved by
   cutting it, weight mass dropped. The policy (which candidates stay sync) comes from
   :func:`choose_sync` or the caller.

Rewrite (:class:`BranchRewrite`): applies a :class:`BranchPlan` — permutes every constant
along its channel axis, turns branched convolutions into ``groups=K`` convolutions with only
the diagonal blocks of their weights. With every candidate kept as a sync point the rewritten
module computes exactly what the original does (only permuted internally). The channel split
(:class:`~splitc.passes.split.channel.ChannelSplit`, which keeps group-aligned convolutions
local) then puts branch k on device k, with transfers only at sync points.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from splitc import optional
from splitc.errors import SplitcError
from splitc.passes.ir import (
    const_array,
    main_block,
    op_name,
    output_vars,
    rebuild_main,
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

#: Channel axis of every tensor the pass permutes (NCHW activations, [N, C] features).
AXIS = 1
#: Balanced swaps: at most this many per class of interchangeable atoms and round; classes
#: larger than MAX_CLASS keep the contiguous partition (the gain matrix is MAX_CLASS^2).
MAX_SWAPS, MAX_CLASS = 256, 2048


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Layer:
    """A convolution or matmul with constant weights: reads space ``src``, writes ``dst``."""

    name: str
    op: str
    src: str            # input variable
    dst: str            # output variable
    weight: np.ndarray  # OIHW, or [C_in, C_out] for matmul
    groups: int = 1
    in_bytes: int = 0


@dataclass
class Analysis:
    """Spaces, atoms, layers and the partition of one module (see the module docstring)."""

    k: int
    channels: dict[str, int]               # var -> channel count (rank >= 2 tensors)
    space: dict[str, str]                  # var -> its space (a representative var)
    fixed: set[str]                        # spaces whose order must stay
    layers: list[Layer]
    branch: dict[tuple[str, int], int] = field(default_factory=dict)  # (space, ch) -> branch
    perms: dict[str, np.ndarray] = field(default_factory=dict)        # space -> permutation

    def candidates(self) -> list[Layer]:
        """Dense convolutions between two partitioned spaces (branchable)."""
        return [lay for lay in self.layers if lay.op == "nn.conv2d" and lay.groups == 1
                and self.partitioned(self.space[lay.src]) and
                self.partitioned(self.space[lay.dst])]

    def partitioned(self, space: str) -> bool:
        c = self.channels[space]
        return c % self.k == 0 and c >= self.k and space not in self.unpartitioned

    unpartitioned: set[str] = field(default_factory=set)  # model inputs, misaligned groups


def analyse(mod: tvm.IRModule, k: int, refine_rounds: int = 4,
            activations: dict[str, np.ndarray] | None = None) -> Analysis:
    """Spaces, atoms, layers and the knowledge partition of ``main`` into ``k`` branches.

    ``activations``: variable name -> its values on calibration data (``[N, C, ...]``), for
    the co-firing edges; any subset of the variables."""
    if k < 2:
        raise SplitcError("a branch split needs at least 2 branches (devices)")
    func = mod["main"]
    block = main_block(mod)
    uf = _UnionFind()
    channels: dict[str, int] = {}
    opaque: set[str] = set()
    layers: list[Layer] = []

    def chans(var) -> int | None:
        shape = static_shape(var)
        return shape[AXIS] if len(shape) >= 2 else None

    for p in func.params:
        if chans(p) is not None:
            channels[p.name] = chans(p)
            uf.find(p.name)
    for b in block.bindings:
        var, call = b.var, b.value
        out_c = chans(var) if isinstance(call, relax.Call) else None
        ins = [v for v in var_inputs(call) if v.name in channels]
        if out_c is None:
            opaque.update(v.name for v in ins)
            continue
        channels[var.name] = out_c
        uf.find(var.name)
        name = op_name(call)
        same = [v for v in ins if channels[v.name] == out_c]
        if name == "nn.conv2d" and isinstance(call.args[1], tvm.ir.GenericConst) \
                and call.attrs.data_layout == "NCHW" and call.attrs.kernel_layout == "OIHW":
            src = call.args[0]
            layers.append(Layer(var.name, name, src.name, var.name, const_array(call.args[1]),
                                int(call.attrs.groups), _nbytes(src)))
        elif name == "matmul" and isinstance(call.args[1], tvm.ir.GenericConst) \
                and len(static_shape(call.args[1])) == 2 and len(static_shape(var)) == 2:
            src = call.args[0]
            layers.append(Layer(var.name, name, src.name, var.name, const_array(call.args[1]),
                                1, _nbytes(src)))
        elif name in UNARY_ELEMENTWISE or name in PER_CHANNEL_NCHW or \
                name in BINARY_ELEMENTWISE:
            for v in same:
                uf.union(var.name, v.name)
            opaque.update(v.name for v in ins if v not in same and channels[v.name] != 1)
            if name in BINARY_ELEMENTWISE and not _channel_consts_ok(call, var):
                opaque.add(var.name)
        elif name in REDUCTIONS and call.attrs.axis is not None and bool(call.attrs.keepdims) \
                and AXIS not in [int(a) % len(static_shape(call.args[0]))
                                 for a in call.attrs.axis]:
            for v in same:
                uf.union(var.name, v.name)
        elif name in ("reshape", "flatten") and ins and _keeps_channels(ins[0], var):
            uf.union(var.name, ins[0].name)
        else:
            opaque.add(var.name)
            opaque.update(v.name for v in ins)
    space = {v: uf.find(v) for v in channels}
    fixed = {space[v] for v in opaque}
    inputs = {space[p.name] for p in func.params if p.name in space}
    fixed |= inputs
    fixed |= {space[v.name] for v in output_vars(func) if v.name in space}
    # a matmul's output space feeds the classifier head: keep it in order
    fixed |= {space[lay.dst] for lay in layers if lay.op == "matmul"}
    # a grouped convolution whose groups do not divide into K branches cannot be cut
    blocked = {space[v] for lay in layers if lay.op == "nn.conv2d" and lay.groups > 1
               and lay.groups % k for v in (lay.src, lay.dst)}
    ana = Analysis(k, channels, space, fixed, layers, unpartitioned=inputs | blocked)
    _partition(ana, refine_rounds, activations or {})
    return ana


def _nbytes(var) -> int:
    return tensor_ref(var).nbytes


def _keeps_channels(src, dst) -> bool:
    a, b = static_shape(src), static_shape(dst)
    return len(a) >= 2 and len(b) >= 2 and a[:2] == b[:2] and \
        int(np.prod(a[2:])) == 1 and int(np.prod(b[2:])) == 1


def _channel_consts_ok(call, var) -> bool:
    """A binary op's constant operands broadcast along the channel axis (extent 1 or C)."""
    rank, c = len(static_shape(var)), static_shape(var)[AXIS]
    for a in call.args:
        if isinstance(a, tvm.ir.GenericConst):
            shape = static_shape(a)
            ax = AXIS - (rank - len(shape))
            if ax >= 0 and shape[ax] not in (1, c):
                return False
    return True


def _partition(ana: Analysis, rounds: int, activations: dict[str, np.ndarray]) -> None:
    """Branch of every channel of every partitioned space: atoms, then balanced swaps."""
    k = ana.k
    spaces = sorted({s for s in set(ana.space.values()) if ana.partitioned(s)})
    atoms = _UnionFind()
    for lay in ana.layers:
        if lay.op != "nn.conv2d" or lay.groups == 1:
            continue
        a, b = ana.space[lay.src], ana.space[lay.dst]
        if a not in spaces or b not in spaces:
            continue
        per_in, per_out = ana.channels[a] // lay.groups, ana.channels[b] // lay.groups
        for g in range(lay.groups):
            root = (a, g * per_in)
            for i in range(g * per_in, (g + 1) * per_in):
                atoms.union(root, (a, i))
            for o in range(g * per_out, (g + 1) * per_out):
                atoms.union(root, (b, o))
    nodes = [(s, c) for s in spaces for c in range(ana.channels[s])]
    roots = sorted({atoms.find(n) for n in nodes})
    index = {r: i for i, r in enumerate(roots)}
    atom_of = {n: index[atoms.find(n)] for n in nodes}
    members: list[list[tuple[str, int]]] = [[] for _ in roots]
    for n in nodes:
        members[atom_of[n]].append(n)
    # the contiguous partition (group-aligned when the groups divide into K)
    branch = np.array([min(c * k // ana.channels[s] for s, c in m) for m in members])
    pinned = np.array([any(s in ana.fixed for s, _ in m) for m in members])
    # affinity between atoms: the dense layers' weight mass (sparse: big models have tens of
    # thousands of channels)
    n = len(roots)
    rows, cols, vals = [], [], []
    for lay in ana.layers:
        if lay.op != "nn.conv2d" or lay.groups != 1:
            continue
        a, b = ana.space[lay.src], ana.space[lay.dst]
        if a not in spaces or b not in spaces:
            continue
        mass = np.abs(lay.weight).sum(axis=(2, 3))  # [out, in]
        mass /= mass.sum() or 1.0
        src = np.array([atom_of[(a, i)] for i in range(mass.shape[1])])
        dst = np.array([atom_of[(b, o)] for o in range(mass.shape[0])])
        rows.append(np.repeat(dst, len(src)))
        cols.append(np.tile(src, len(dst)))
        vals.append(mass.reshape(-1))
    for s, corr in _cofiring(ana, spaces, activations).items():
        ids = np.array([atom_of[(s, c)] for c in range(len(corr))])
        rows.append(np.repeat(ids, len(ids)))
        cols.append(np.tile(ids, len(ids)))
        vals.append(corr.reshape(-1) / 2)  # (the matrix is symmetrised below)
    sparse = optional.scipy_sparse()
    if rows:
        aff = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                       np.concatenate(cols))), shape=(n, n))
    else:
        aff = sparse.coo_matrix((n, n))
    aff = (aff + aff.T).tocsc()
    aff.setdiag(0.0)
    aff.eliminate_zeros()
    signature = [tuple(sorted({(s, sum(1 for s2, _ in m if s2 == s)) for s, _ in m}))
                 for m in members]
    classes: dict[tuple, list[int]] = {}
    for i, sig in enumerate(signature):
        if not pinned[i]:
            classes.setdefault(sig, []).append(i)
    onehot = np.eye(k)[branch]
    d = np.asarray(aff @ onehot)  # d[a, g]: affinity of atom a to branch g
    for _ in range(rounds):
        improved = False
        for idx in classes.values():
            if len(idx) > MAX_CLASS:
                continue
            idx = np.array(idx)
            sub = aff[idx][:, idx].toarray()
            for _swap in range(min(len(idx), MAX_SWAPS)):
                p, q = branch[idx], branch[idx]
                # gain of swapping atoms a and b (a to b's branch and back)
                da_q = d[idx][:, q]                         # [a, b]: d[a, branch[b]]
                da_p = d[idx, p][:, None]
                db_p = d[idx][:, p].T                       # [a, b]: d[b, branch[a]]
                db_q = d[idx, q][None, :]
                gain = da_q - da_p + db_p - db_q - 2 * sub
                gain[p[:, None] == q[None, :]] = -np.inf
                ia, ib = np.unravel_index(np.argmax(gain), gain.shape)
                if not gain[ia, ib] > 1e-12:
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
    for i, m in enumerate(members):
        for node in m:
            ana.branch[node] = int(branch[i])
    for s in set(ana.space.values()):
        c = ana.channels[s]
        if s in spaces and s not in ana.fixed:
            # branch by branch; inside a branch, atoms in order, channels in order (keeps
            # every grouped convolution's groups whole and matched across its two spaces)
            order = sorted(range(c), key=lambda ch, s=s: (ana.branch[(s, ch)],
                                                          atom_of[(s, ch)], ch))
            ana.perms[s] = np.array(order)
        else:
            ana.perms[s] = np.arange(c)


def _cofiring(ana: Analysis, spaces: list[str], activations: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """Per space with calibration activations: |correlation| between its channels, pooled
    over its variables and positions, normalised to total 1 (diagonal zero)."""
    samples: dict[str, list[np.ndarray]] = {}
    for var, a in activations.items():
        s = ana.space.get(var)
        if s in spaces and a.ndim >= 2 and a.shape[AXIS] == ana.channels[s]:
            samples.setdefault(s, []).append(np.moveaxis(a, AXIS, -1).reshape(-1, a.shape[AXIS]))
    out = {}
    for s, parts in samples.items():
        data = np.concatenate(parts).astype(np.float64)
        data = data[:: max(1, len(data) // 20000)]  # enough positions for a correlation
        std = data.std(axis=0)
        live = std > 1e-12
        corr = np.zeros((data.shape[1], data.shape[1]))
        if live.sum() > 1:
            corr[np.ix_(live, live)] = np.abs(np.corrcoef(data[:, live], rowvar=False))
        np.fill_diagonal(corr, 0.0)
        if corr.sum() > 0:
            out[s] = corr / corr.sum()
    return out


@dataclass(frozen=True)
class Candidate:
    """A branch candidate priced for the transmission policy."""

    layer: str
    input: str
    gather_bytes: int      # bytes an all-gather of its input sends (K-1 copies)
    dropped_mass: float    # fraction of the layer's |W| outside the diagonal blocks


def sync_candidates(ana: Analysis) -> list[Candidate]:
    """Every branch candidate with what keeping it dense costs and cutting it loses."""
    out = []
    for lay in ana.candidates():
        w = np.abs(permuted_weight(ana, lay)).sum(axis=(2, 3))
        co, ci = w.shape
        keep = np.zeros_like(w, dtype=bool)
        for g in range(ana.k):
            keep[g * co // ana.k:(g + 1) * co // ana.k, g * ci // ana.k:(g + 1) * ci // ana.k] = 1
        total = w.sum() or 1.0
        out.append(Candidate(lay.name, lay.src, (ana.k - 1) * lay.in_bytes,
                             float(w[~keep].sum() / total)))
    return out


def permuted_weight(ana: Analysis, lay: Layer) -> np.ndarray:
    """The layer's weight with its output (and, for dense layers, input) channels permuted."""
    po, pi = ana.perms[ana.space[lay.dst]], ana.perms[ana.space[lay.src]]
    if lay.op == "matmul":
        return lay.weight[pi][:, po]
    w = lay.weight[po]
    return w[:, pi] if lay.groups == 1 else w


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
        if spent + c.dropped_mass <= budget + 1e-12:
            spent += c.dropped_mass
            cut.add(c.layer)
    return frozenset(c.layer for c in cands if c.layer not in cut)


@dataclass(frozen=True)
class BranchPlan:
    """What :class:`BranchRewrite` applies: K, each variable's channel permutation (only
    those that are not the identity), and which candidate layers become K-branch convs."""

    k: int
    perms: dict[str, tuple[int, ...]]
    branched: frozenset[str]

    def to_json(self) -> str:
        return json.dumps({"k": self.k, "branched": sorted(self.branched),
                           "perms": {v: list(p) for v, p in self.perms.items()}})

    @classmethod
    def from_json(cls, text: str) -> BranchPlan:
        d = json.loads(text)
        return cls(int(d["k"]), {v: tuple(p) for v, p in d["perms"].items()},
                   frozenset(d["branched"]))


def plan_branches(mod: tvm.IRModule, k: int, sync: frozenset[str] | str | float = "all",
                  analysis: Analysis | None = None) -> BranchPlan:
    """The branch plan of ``mod`` for ``k`` devices. ``sync``: the candidate layers kept dense
    (a set of names), ``"all"`` (exact), ``"none"``, or a float: the weight-mass budget for
    :func:`choose_sync`."""
    ana = analysis or analyse(mod, k)
    names = {lay.name for lay in ana.candidates()}
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
    perms = {v: tuple(int(i) for i in ana.perms[s]) for v, s in ana.space.items()
             if not np.array_equal(ana.perms[s], np.arange(len(ana.perms[s])))}
    return BranchPlan(k, perms, frozenset(names - keep))


@tvm.transform.module_pass(opt_level=0, name="splitc.BranchRewrite")
class BranchRewrite:
    """Apply a :class:`BranchPlan` to ``main`` (see the module docstring)."""

    def __init__(self, plan: BranchPlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        def perm(var) -> np.ndarray | None:
            p = self.plan.perms.get(var.name)
            return None if p is None else np.array(p)

        return rebuild_main(mod, lambda b, vmap: self._rewrite(b, perm, vmap))

    def _rewrite(self, b, perm, vmap) -> relax.Expr:
        call, var = b.value, b.var
        if not isinstance(call, relax.Call):
            return substitute(call, vmap)
        args = [vmap.get(a, a) if isinstance(a, relax.Var) else a for a in call.args]
        name = op_name(call)
        po = perm(var)
        if name == "nn.conv2d" and isinstance(call.args[1], tvm.ir.GenericConst):
            w = const_array(call.args[1])
            pi = perm(call.args[0])
            groups = int(call.attrs.groups)
            if po is not None:
                w = w[po]
            if groups == 1 and pi is not None:
                w = w[:, pi]
            a = call.attrs
            if var.name in self.plan.branched:
                k = self.plan.k
                co, ci = w.shape[0] // k, w.shape[1] // k
                w = np.concatenate([w[g * co:(g + 1) * co, g * ci:(g + 1) * ci]
                                    for g in range(k)])
                groups = k
            return relax.op.nn.conv2d(
                args[0], relax.const(np.ascontiguousarray(w)), strides=a.strides,
                padding=a.padding, dilation=a.dilation, groups=groups,
                data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype=a.out_dtype)
        if name == "matmul" and isinstance(call.args[1], tvm.ir.GenericConst):
            w = const_array(call.args[1])
            pi = perm(call.args[0])
            if pi is not None and w.ndim == 2:
                w = w[pi]
            if po is not None and w.ndim == 2:
                w = w[:, po]
            return relax.op.matmul(args[0], relax.const(np.ascontiguousarray(w)),
                                   out_dtype=call.attrs.out_dtype)
        if po is not None and name in BINARY_ELEMENTWISE:
            rank = len(static_shape(var))
            new = []
            for a in args:
                if isinstance(a, tvm.ir.GenericConst):
                    arr = const_array(a)
                    ax = AXIS - (rank - arr.ndim)
                    if ax >= 0 and arr.shape[ax] == len(po):
                        a = relax.const(np.ascontiguousarray(np.take(arr, po, axis=ax)))
                new.append(a)
            args = new
        return relax.Call(call.op, args, call.attrs, call.ty_args)


__all__ = ["Analysis", "BranchPlan", "BranchRewrite", "Candidate", "analyse", "choose_sync",
           "plan_branches", "sync_candidates"]
