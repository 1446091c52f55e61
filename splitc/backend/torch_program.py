"""A Relax module run by torch: :class:`TorchProgram` evaluates ``main`` with torch operators,
its tensor constants turned into trainable parameters — one implementation of each operator,
so a teacher (the original module) and a student (its branch rewrite) run the same code, and
the FPGA path can run a float model around its emulated pieces.
:meth:`TorchProgram.to_module` writes trained constants back into the Relax module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.ir import (
    main_block,
    op_name,
    output_vars,
    rebuild_main,
    static_shape,
    substitute,
)
from splitc.passes.split.branch import unique_names


def pads(padding) -> tuple[int, int, int, int]:
    p = [int(v) for v in padding]
    if len(p) == 2:
        p = p + p
    return p[0], p[1], p[2], p[3]  # top, left, bottom, right


def _conv2d(x, w, a):
    top, left, bottom, right = pads(a.padding)
    pad = (top, left)
    if (top, left) != (bottom, right):
        x, pad = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.conv2d(x, w, stride=[int(s) for s in a.strides], padding=pad,
                    dilation=[int(d) for d in a.dilation], groups=int(a.groups))


def _pool(kind):
    def run(x, a):
        top, left, bottom, right = pads(a.padding)
        k, s = [int(v) for v in a.pool_size], [int(v) for v in a.strides]
        if kind == "max":
            x = F.pad(x, (left, right, top, bottom), value=-math.inf)
            return F.max_pool2d(x, k, s, dilation=[int(d) for d in a.dilation],
                                ceil_mode=bool(a.ceil_mode))
        if (top, left) == (bottom, right):
            return F.avg_pool2d(x, k, s, padding=(top, left), ceil_mode=bool(a.ceil_mode),
                                count_include_pad=bool(a.count_include_pad))
        raise SplitcError("avg_pool2d with asymmetric padding is not supported for training")
    return run


def _axes(a, rank):
    return [int(v) % rank for v in a.axis] if a.axis is not None else list(range(rank))


#: op name -> f(args, attrs, out_shape) (args are tensors or Python values)
OPS: dict[str, Callable] = {
    "nn.conv2d": lambda args, a, _s: _conv2d(args[0], args[1], a),
    "add": lambda args, a, _s: args[0] + args[1],
    "subtract": lambda args, a, _s: args[0] - args[1],
    "multiply": lambda args, a, _s: args[0] * args[1],
    "divide": lambda args, a, _s: args[0] / args[1],
    "maximum": lambda args, a, _s: torch.maximum(args[0], args[1]),
    "minimum": lambda args, a, _s: torch.minimum(args[0], args[1]),
    "nn.relu": lambda args, a, _s: F.relu(args[0]),
    "nn.relu6": lambda args, a, _s: F.relu6(args[0]),
    "sigmoid": lambda args, a, _s: torch.sigmoid(args[0]),
    "tanh": lambda args, a, _s: torch.tanh(args[0]),
    "nn.silu": lambda args, a, _s: F.silu(args[0]),
    "nn.gelu": lambda args, a, _s: F.gelu(args[0]),
    "clip": lambda args, a, _s: torch.clamp(args[0], float(args[1]), float(args[2])),
    "nn.dropout": lambda args, a, _s: args[0],
    "nn.max_pool2d": lambda args, a, _s: _pool("max")(args[0], a),
    "nn.avg_pool2d": lambda args, a, _s: _pool("avg")(args[0], a),
    "nn.adaptive_avg_pool2d": lambda args, a, _s: F.adaptive_avg_pool2d(
        args[0], [int(v) for v in a.output_size] if a.output_size is not None else 1),
    "mean": lambda args, a, _s: args[0].mean(dim=_axes(a, args[0].dim()),
                                            keepdim=bool(a.keepdims)),
    "sum": lambda args, a, _s: args[0].sum(dim=_axes(a, args[0].dim()),
                                          keepdim=bool(a.keepdims)),
    # the batch axis follows the data (the module was imported for batch 1; a reshape that
    # folds positions into the leading axis, [1, H, W, C] -> [H * W, C], folds the batch too)
    "reshape": lambda args, a, s: args[0].reshape(-1, *s[1:]),
    "flatten": lambda args, a, s: args[0].reshape(-1, *s[1:]),
    "matmul": lambda args, a, _s: args[0] @ args[1],
    "permute_dims": lambda args, a, _s: args[0].permute(*[int(v) for v in a.axes]),
    "concat": lambda args, a, _s: torch.cat(list(args[0]), dim=int(a.axis)),
    "nn.softmax": lambda args, a, _s: F.softmax(args[0], dim=int(a.axis)),
    # what importers produce for normalisation, attention to channels and modern activations
    "nn.log_softmax": lambda args, a, _s: F.log_softmax(args[0], dim=int(a.axis)),
    "nn.layer_norm": lambda args, a, _s: _layer_norm(args, a),
    "nn.group_norm": lambda args, a, _s: _group_norm(args, a),
    "nn.gelu_tanh": lambda args, a, _s: F.gelu(args[0], approximate="tanh"),
    "nn.leakyrelu": lambda args, a, _s: F.leaky_relu(args[0], float(a.alpha)),
    "nn.softplus": lambda args, a, _s: F.softplus(args[0], float(a.beta), float(a.threshold)),
    "nn.selu": lambda args, a, _s: F.selu(args[0]),
    "nn.prelu": lambda args, a, _s: _prelu(args, a),
    "erf": lambda args, a, _s: torch.erf(args[0]),
    "exp": lambda args, a, _s: torch.exp(args[0]),
    "log": lambda args, a, _s: torch.log(args[0]),
    "sqrt": lambda args, a, _s: torch.sqrt(args[0]),
    "rsqrt": lambda args, a, _s: torch.rsqrt(args[0]),
    "square": lambda args, a, _s: args[0] * args[0],
    "abs": lambda args, a, _s: torch.abs(args[0]),
    "negative": lambda args, a, _s: -args[0],
    "power": lambda args, a, _s: torch.pow(args[0], args[1]),
    "astype": lambda args, a, _s: args[0].to(getattr(torch, str(a.dtype))),
    "variance": lambda args, a, _s: args[0].var(dim=_axes(a, args[0].dim()), unbiased=False,
                                                keepdim=bool(a.keepdims)),
    "std": lambda args, a, _s: args[0].std(dim=_axes(a, args[0].dim()), unbiased=False,
                                          keepdim=bool(a.keepdims)),
    "max": lambda args, a, _s: args[0].amax(dim=_axes(a, args[0].dim()),
                                           keepdim=bool(a.keepdims)),
    "min": lambda args, a, _s: args[0].amin(dim=_axes(a, args[0].dim()),
                                           keepdim=bool(a.keepdims)),
    "expand_dims": lambda args, a, s: args[0].reshape(-1, *s[1:]),
    "squeeze": lambda args, a, s: args[0].reshape(-1, *s[1:]),
    # moving channels: what branch models and channel shuffles are made of
    "take": lambda args, a, _s: torch.index_select(args[0], int(a.axis) % args[0].dim(),
                                                   args[1].long()),
    "strided_slice": lambda args, a, _s: _strided_slice(args),
    "split": lambda args, a, _s: _split(args[0], a),
}


def _layer_norm(args, a):
    x, gamma, beta = args
    axes = [int(v) % x.dim() for v in a.axes]
    mean = x.mean(dim=axes, keepdim=True)
    var = x.var(dim=axes, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(a.epsilon))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.dim())]
    if bool(a.scale):
        y = y * gamma.reshape(shape)
    if bool(a.center):
        y = y + beta.reshape(shape)
    return y


def _group_norm(args, a):
    x, gamma, beta = args
    ax = int(a.channel_axis) % x.dim()
    if ax != 1 or sorted(int(v) % x.dim() for v in a.axes) != list(range(2, x.dim())):
        raise SplitcError("group_norm over other axes than channels-first is not supported "
                          "for training")
    return F.group_norm(x, int(a.num_groups), gamma if bool(a.scale) else None,
                        beta if bool(a.center) else None, float(a.epsilon))


def _prelu(args, a):
    x, alpha = args
    shape = [1] * x.dim()
    shape[int(a.axis) % x.dim()] = -1
    return torch.where(x >= 0, x, x * alpha.reshape(shape))


def _strided_slice(args):
    x, axes, begin, end = args[:4]
    strides = args[4] if len(args) > 4 else [1] * len(axes)
    index = [slice(None)] * x.dim()
    for ax, b, e, st in zip(axes, begin, end, strides, strict=True):
        ax = int(ax) % x.dim()
        if ax == 0:
            raise SplitcError("strided_slice on the batch axis is not supported for training")
        index[ax] = slice(int(b), int(e), int(st))
    return x[tuple(index)]


def _split(x, a):
    ax = int(a.axis) % x.dim()
    sections = a.indices_or_sections
    if isinstance(sections, tvm.tirx.IntImm | int):
        return list(torch.tensor_split(x, int(sections), dim=ax))
    return list(torch.tensor_split(x, [int(v) for v in sections], dim=ax))


def unsupported(mod: tvm.IRModule) -> dict[str, str]:
    """The ops of ``main`` that :class:`TorchProgram` cannot run: op -> first binding."""
    out: dict[str, str] = {}
    for b in main_block(mod).bindings:
        name = op_name(b.value)
        if name not in OPS and name != "TupleGetItem" and not isinstance(b.value, relax.Var):
            out.setdefault(name, b.var.name)
    return out


def check_trainable(mod: tvm.IRModule) -> None:
    """Refuse, before any training, a module with ops torch cannot train through (naming
    every one)."""
    missing = unsupported(mod)
    if missing:
        shown = ", ".join(f"{op} (binding {var})" for op, var in sorted(missing.items()))
        raise SplitcError(f"`splitc finetune` cannot train through {shown}: these ops have no "
                          "torch implementation in splitc.backend.torch_program")


class TorchProgram(torch.nn.Module):
    """``main`` of a Relax module as a torch module; constants are parameters.

    Parameters
    ----------
    mod : IRModule
        A module with a single dataflow block in ``main`` (what the importer produces).
    """

    def __init__(self, mod: tvm.IRModule):
        super().__init__()
        mod = unique_names(mod)  # (parameters and values are keyed by binding name)
        self.mod = mod
        func = mod["main"]
        self.inputs = [p.name for p in func.params]
        self.outputs = [v.name for v in output_vars(func)]
        self.steps = []
        params = {}
        for b in main_block(mod).bindings:
            call = b.value
            name = op_name(call)
            if isinstance(call, relax.TupleGetItem):  # an item of a split
                self.steps.append((b.var.name, "TupleGetItem",
                                   [("var", call.tuple_value.name), ("value", int(call.index))],
                                   None, None))
                continue
            if isinstance(call, relax.Var):  # an alias
                self.steps.append((b.var.name, "alias", [("var", call.name)], None, None))
                continue
            if name not in OPS:
                check_trainable(mod)
            args = []
            for i, a in enumerate(call.args):
                if isinstance(a, relax.Var):
                    args.append(("var", a.name))
                elif isinstance(a, relax.Tuple) and all(isinstance(f, tvm.tirx.IntImm)
                                                        for f in a.fields):
                    args.append(("value", [int(f.value) for f in a.fields]))  # slice bounds
                elif isinstance(a, relax.Tuple):
                    args.append(("tuple", [f.name for f in a.fields]))
                elif isinstance(a, tvm.ir.GenericConst):
                    key = f"{b.var.name}__{i}"
                    value = torch.from_numpy(a.value.numpy().copy())
                    params[key] = torch.nn.Parameter(value, requires_grad=value.is_floating_point()
                                                     and value.dim() > 0)
                    args.append(("param", key))
                elif isinstance(a, relax.ShapeExpr):
                    args.append(("value", None))  # a reshape's target: the static shape
                elif isinstance(a, tvm.ir.Constant) and hasattr(a, "value") \
                        and isinstance(a.value, int | float):  # a scalar (clip bounds)
                    args.append(("value", float(a.value)))
                else:
                    raise SplitcError(f"`splitc finetune`: unsupported argument {type(a).__name__}"
                                      f" of {name} ({b.var.name})")
            shape = static_shape(b.var) if isinstance(b.var.ty, relax.TensorType) else None
            self.steps.append((b.var.name, name, args, call.attrs, shape))
        self.weights = torch.nn.ParameterDict(params)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        # each value freed once read for the last time: kept, every value of a 224x224
        # network on a batch of 256 pages took 8 GB (17 GB with the examples: killed)
        env = self.run(*inputs, keep=set())
        return [env[o] for o in self.outputs]

    def channel_samples(self, x: np.ndarray, axes: dict[str, int], *, limit: int = 128,
                        rows: int = 20000, chunk: int = 8) -> dict[str, np.ndarray]:
        """Per variable named in ``axes`` (name -> its channel axis): at most about ``rows`` of
        its channel vectors (``[rows, C]``: one per example and position, evenly spaced),
        from the first ``limit`` examples of ``x``, run ``chunk`` at a time. Only the samples
        are kept, not the values: every value of a 224x224 network on 128 pages is 7.5 GB."""
        n = min(limit, len(x))
        got: dict[str, list[np.ndarray]] = {v: [] for v in axes}
        with torch.no_grad():
            for i in range(0, n, chunk):
                xs = torch.from_numpy(np.ascontiguousarray(x[i:min(i + chunk, n)], np.float32))
                env = self.run(xs, keep=set(axes))
                want = max(1, rows * len(xs) // n)
                for var, axis in axes.items():
                    t = env.get(var)
                    if not isinstance(t, torch.Tensor) or t.ndim <= axis:
                        continue
                    flat = t.movedim(axis, -1).reshape(-1, t.shape[axis])
                    got[var].append(flat[::max(1, len(flat) // want)][:want].numpy().copy())
        return {v: np.concatenate(parts) for v, parts in got.items() if parts}

    def last_uses(self) -> list[list[str]]:
        """Per step, the variables no later step reads."""
        if not hasattr(self, "_frees"):
            last: dict[str, int] = {}
            for i, (_var, _name, args, _attrs, _shape) in enumerate(self.steps):
                for kind, ref in args:
                    for r in ([ref] if kind == "var" else ref if kind == "tuple" else []):
                        last[r] = i
            self._frees: list[list[str]] = [[] for _ in self.steps]
            for r, i in last.items():
                self._frees[i].append(r)
        return self._frees

    def run(self, *inputs: torch.Tensor, override: dict[str, torch.Tensor] | None = None,
            until: str | None = None, env: dict[str, torch.Tensor] | None = None,
            keep: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Every variable of ``main``, by name; ``override`` replaces the named variables'
        values as they are computed (to run part of the model elsewhere); ``until``: stop
        once that variable is computed; ``env``: values already computed (not computed
        again: a run continued); ``keep``: keep only these variables, the outputs and what
        later steps still read (the rest is freed once read for the last time)."""
        env = {**dict(zip(self.inputs, inputs, strict=True)), **(env or {})}
        override = override or {}
        frees = self.last_uses() if keep is not None else None
        keep = None if keep is None else {*keep, *self.outputs}
        for i, (var, name, args, attrs, shape) in enumerate(self.steps):
            if until is not None and until in env:
                break
            if var in env:
                continue
            vals = []
            for kind, ref in args:
                if kind == "var":
                    vals.append(env[ref])
                elif kind == "tuple":
                    vals.append([env[r] for r in ref])
                elif kind == "param":
                    vals.append(self.weights[ref])
                else:
                    vals.append(ref)
            if var in override:
                env[var] = override[var]
            elif name == "TupleGetItem":
                env[var] = vals[0][vals[1]]
            elif name == "alias":
                env[var] = vals[0]
            else:
                env[var] = OPS[name](vals, attrs, shape)
            if frees is not None:
                for r in frees[i]:
                    if r not in keep:
                        env.pop(r, None)
        return env

    def to_module(self) -> tvm.IRModule:
        """The Relax module with this program's (trained) constants."""
        def rewrite(b, vmap):
            if not isinstance(b.value, relax.Call):
                return substitute(b.value, vmap)
            args = []
            for i, a in enumerate(b.value.args):
                if isinstance(a, tvm.ir.GenericConst):
                    a = relax.const(self.weights[f"{b.var.name}__{i}"].detach().cpu().numpy()
                                    .astype(str(a.ty.dtype)))
                else:
                    a = substitute(a, vmap)
                args.append(a)
            return relax.Call(b.value.op, args, b.value.attrs, b.value.ty_args)

        return rebuild_main(self.mod, rewrite)
