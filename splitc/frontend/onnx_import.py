"""ONNX files → Relax, normalised first (see :mod:`splitc.frontend`): inputs pinned, shapes
inferred, constant subgraphs folded, then TVM's ONNX importer."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper

from splitc.errors import SplitcError, short_message
from splitc.frontend.model import ImportedModel, OnnxReference
from splitc.frontend.relax_cleanup import finish_relax
from splitc.frontend.shapes import Dim, resolve_input_shapes
from splitc.passes.ir import main_block, op_name, var_inputs

#: Constant folding never materialises a tensor larger than this (elements).
MAX_FOLD_ELEMENTS = 1 << 24
#: Initializers up to this many elements stay visible to shape inference (shape tensors);
#: larger ones are declared by type only, which keeps inference fast on big models.
SHAPE_INFERENCE_MAX_INIT = 4096
#: Ops never folded even with constant inputs (random) or with subgraphs.
NO_FOLD_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli", "If", "Loop", "Scan"}
#: Ops TVM's ONNX importer handles outside its converter table.
TVM_EXTRA_OPS = {"Constant", "If"}


def read_onnx(path: Path) -> onnx.ModelProto:
    """Load an ONNX file, or a :class:`SplitcError` naming the file."""
    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise SplitcError(f"model file {path} does not exist") from None
    except OSError as e:
        raise SplitcError(f"cannot read {path}: {e}") from None
    except Exception as e:  # protobuf DecodeError and friends
        raise SplitcError(f"{path} is not a valid ONNX file ({type(e).__name__}: "
                          f"{short_message(e)})") from None
    if not model.HasField("graph") or not model.graph.output or model.ir_version < 3:
        raise SplitcError(f"{path} is not a valid ONNX model (no graph, no outputs or IR "
                          f"version {model.ir_version} < 3)")
    return model


def onnx_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real graph inputs (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _declared_dims(value: onnx.ValueInfoProto, label: str) -> list[Dim] | None:
    """An input's dims: int, dim_param str, or None; None overall for unknown rank."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise SplitcError(f"{label}: input {value.name!r} is not a tensor "
                          f"({value.type.WhichOneof('value')}); only tensor inputs are "
                          "supported")
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tensor.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(d.dim_value if kind == "dim_value" and d.dim_value > 0
                    else (d.dim_param or None))
    return dims


def _onnx_dtype(value: onnx.ValueInfoProto) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def pin_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None,
               label: str) -> tuple[list[tuple[int, ...]], bool]:
    """Write static input shapes into ``model`` (in place).

    Also drops the shapes of graph outputs that had symbolic dims, so shape inference fills
    them in again.

    Returns
    -------
    shapes : list of tuple of int
        One static shape per real input.
    changed : bool
        Whether the model was modified.
    """
    inputs = onnx_inputs(model)
    declared = [(i.name, _declared_dims(i, label)) for i in inputs]
    shapes = resolve_input_shapes(label, declared, input_shapes)
    changed = False
    for value, (_, dims), shape in zip(inputs, declared, shapes, strict=True):
        if dims is not None and list(dims) == list(shape):
            continue
        tensor_shape = value.type.tensor_type.shape
        tensor_shape.Clear()
        for s in shape:
            tensor_shape.dim.add().dim_value = s
        changed = True
    for out in model.graph.output:
        t = out.type.tensor_type
        if t.HasField("shape") and any(d.WhichOneof("value") != "dim_value"
                                       for d in t.shape.dim):
            t.ClearField("shape")
            changed = True
    return shapes, changed


def infer_shapes(model: onnx.ModelProto, label: str = "model") -> None:
    """Run ONNX shape inference (with data propagation) and store its results in ``model``.

    Large initializers are shown to the inference by type only, so this stays fast on
    full-size models; ``graph.value_info`` is replaced and graph output types are filled in.
    """
    g = model.graph
    declared = {i.name for i in g.input}
    small, typed = [], []
    for t in g.initializer:
        if math.prod(t.dims) <= SHAPE_INFERENCE_MAX_INIT:
            small.append(t)
        elif t.name not in declared:
            typed.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    light = onnx.helper.make_model(
        onnx.helper.make_graph(g.node, g.name or "graph", list(g.input) + typed, g.output,
                               initializer=small),
        opset_imports=model.opset_import, ir_version=model.ir_version,
        functions=model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False,
                                                     strict_mode=False, data_prop=True)
    except Exception as e:
        raise SplitcError(f"{label}: ONNX shape inference failed: {short_message(e)}") from None
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    for out, inf in zip(g.output, inferred.graph.output, strict=True):
        if inf.type.tensor_type.HasField("shape") and not out.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape is fully static: inputs, value_info, outputs, initializers."""
    shapes: dict[str, tuple[int, ...]] = {}
    g = model.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if v.type.WhichOneof("value") == "tensor_type" and t.HasField("shape") and all(
                d.WhichOneof("value") == "dim_value" for d in t.shape.dim):
            shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """The value of a ``Shape`` (with ``start``/``end``) or ``Size`` node."""
    if node.op_type == "Size":
        return np.array(math.prod(shape), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


class _Folder:
    """One constant-folding sweep over a model's top-level graph (see :func:`fold_constants`).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          17)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.values: dict[str, np.ndarray] = {}
        self.shapes = _static_shapes(model)

    def value(self, name: str) -> np.ndarray:
        """The numpy value of a constant (decoded lazily)."""
        if name not in self.values:
            self.values[name] = numpy_helper.to_array(self.inits[name])
        return self.values[name]

    def is_const(self, name: str) -> bool:
        return name == "" or name in self.inits or name in self.values

    def evaluate(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        """Outputs of a foldable node, or None to keep it."""
        if node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD_OPS:
            return None
        if _has_subgraph(node):
            return None
        if node.op_type in ("Shape", "Size") and node.input[0] in self.shapes:
            return [_shape_value(node, self.shapes[node.input[0]])]
        if (not node.input and node.op_type != "Constant") or not all(
                self.is_const(i) for i in node.input):
            return None
        for out in node.output:
            if math.prod(self.shapes.get(out, ())) > MAX_FOLD_ELEMENTS:
                return None
        from onnx.reference import ReferenceEvaluator

        try:
            feeds = {i: self.value(i) for i in node.input if i}
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception:  # the reference evaluator lacks it: leave it to TVM
            return None
        if not all(isinstance(r, np.ndarray | np.generic) for r in results):
            return None
        results = [np.asarray(r) for r in results]
        if any(r.size > MAX_FOLD_ELEMENTS for r in results):
            return None
        return results

    def sweep(self) -> int:
        """Fold what can be folded now; returns the number of nodes folded."""
        g = self.model.graph
        kept, folded = [], 0
        for node in g.node:
            results = self.evaluate(node)
            if results is None or len(results) < len([o for o in node.output if o]):
                kept.append(node)
                continue
            for name, value in zip(node.output, results, strict=False):
                if name:
                    self.values[name] = value
                    tensor = numpy_helper.from_array(value, name)
                    g.initializer.append(tensor)
                    self.inits[name] = tensor
                    self.shapes[name] = tuple(value.shape)
            folded += 1
        if folded:
            del g.node[:]
            g.node.extend(kept)
        return folded


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node (subgraphs included) or produced as an output."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                used |= _used_names(sub)
    return used


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers (and their graph-input entries) that nothing reads any more."""
    g = model.graph
    used = _used_names(g)
    keep = [t for t in g.initializer if t.name in used]
    dropped = {t.name for t in g.initializer} - {t.name for t in keep}
    if dropped:
        del g.initializer[:]
        g.initializer.extend(keep)
        inputs = [i for i in g.input if i.name not in dropped]
        del g.input[:]
        g.input.extend(inputs)
        value_info = [v for v in g.value_info if v.name not in dropped]
        del g.value_info[:]
        g.value_info.extend(value_info)


def fold_constants(model: onnx.ModelProto, label: str = "model", max_rounds: int = 100) -> int:
    """Fold constant subgraphs to a fixpoint, re-inferring shapes between sweeps.

    Returns the number of nodes folded.
    """
    total = 0
    for _ in range(max_rounds):
        infer_shapes(model, label)
        folded = _Folder(model).sweep()
        total += folded
        if not folded:
            break
    prune_initializers(model)
    return total


def normalise_onnx(model: onnx.ModelProto,
                   input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   label: str = "model") -> tuple[list[tuple[int, ...]], bytes | None]:
    """Make an ONNX model static for TVM, in place: pin inputs, infer shapes, fold constants.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.
    input_shapes : mapping, optional
        Static shapes for the inputs with dynamic dims.
    label : str
        The model, for messages.

    Returns
    -------
    shapes : list of tuple of int
        The static input shapes, one per real input.
    pinned : bytes or None
        The model serialised right after its inputs were pinned, before anything else changed
        (what the reference runs), or None if pinning changed nothing (run the file itself).
    """
    shapes, changed = pin_inputs(model, input_shapes, label)
    pinned = model.SerializeToString() if changed else None
    sums_to_adds(model)
    fold_constants(model, label)
    infer_shapes(model, label)
    return shapes, pinned


def sums_to_adds(model: onnx.ModelProto) -> None:
    """Rewrite every n-ary ``Sum`` as a chain of ``Add``s, in place (top-level graph).

    TVM imports ``Sum`` as broadcast + stack + reduce-sum, which copies every operand into a
    new tensor; ResNet-style exports use ``Sum`` for their residual adds.
    """
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Sum" or len(node.input) < 2:
            nodes.append(node)
            continue
        acc = node.input[0]
        for i, operand in enumerate(node.input[1:], start=1):
            out = node.output[0] if i == len(node.input) - 1 else f"{node.output[0]}__sum{i}"
            nodes.append(onnx.helper.make_node("Add", [acc, operand], [out],
                                               name=f"{node.name}__add{i}"))
            acc = out
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _all_nodes(sub)


def tvm_onnx_ops() -> set[str] | None:
    """ONNX op types TVM's Relax importer can convert (None if the table is unreachable)."""
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except ImportError:  # pragma: no cover - TVM layout changed
        return None
    get_map = getattr(onnx_frontend, "_get_convert_map", None)
    if get_map is None:  # pragma: no cover
        return None
    return set(get_map()) | TVM_EXTRA_OPS


def check_onnx_ops(model: onnx.ModelProto, label: str) -> None:
    """Raise a :class:`SplitcError` listing every op (subgraphs included) TVM cannot import."""
    supported = tvm_onnx_ops()
    if supported is None:
        return
    counts: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        if node.op_type not in supported:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        ops = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})"
                        for op, n in sorted(counts.items()))
        raise SplitcError(f"{label}: TVM's ONNX importer does not support operator(s): {ops}")


def onnx_to_relax(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                  dtypes: dict[str, str], label: str) -> tvm.IRModule:
    """``from_onnx`` with weights bound as constants, then ``FoldConstant``; errors wrapped."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            mod = from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()},
                            dtype_dict=dtypes)
    except Exception as e:
        raise SplitcError(f"TVM could not import {label}: {type(e).__name__}: "
                          f"{short_message(e)}") from e
    return finish_relax(mod, label)


#: ONNX ops that stay one Relax binding each, in order, through import (batch norms fold into
#: the convolution before them): the k-th such node is the k-th such binding.
NAMED_OPS = {("Conv",): "nn.conv2d", ("ConvTranspose",): "nn.conv2d_transpose",
             ("MaxPool",): "nn.max_pool2d", ("AveragePool",): "nn.avg_pool2d",
             ("Gemm", "MatMul"): "matmul"}


def layer_names(model: onnx.ModelProto, mod: tvm.IRModule) -> dict[str, str]:
    """What a user knows each Relax binding as: the ONNX node name of each of
    :data:`NAMED_OPS` (e.g. ``/layer1/layer1.0/conv1/Conv``), where the counts agree; a bias
    add keeps its layer's name, and what follows (an activation, a residual add) is that layer
    with the op after it (``/layer1/layer1.0/conv1/Conv+relu``)."""
    names: dict[str, str] = {}
    bindings = list(main_block(mod).bindings)
    for onnx_ops, relax_op in NAMED_OPS.items():
        nodes = [n.name for n in model.graph.node if n.op_type in onnx_ops]
        found = [b.var.name for b in bindings if op_name(b.value) == relax_op]
        if len(nodes) == len(found):
            names.update({v: n for v, n in zip(found, nodes, strict=True) if n})
    for b in bindings:
        if b.var.name in names:
            continue
        first = next((v.name for v in var_inputs(b.value)), None)
        if first not in names:
            continue
        layer = names[first].split("+")[0]
        op = op_name(b.value)
        bias = op == "add" and any(isinstance(a, tvm.ir.GenericConst) for a in b.value.args)
        names[b.var.name] = layer if bias else f"{layer}+{op.removeprefix('nn.')}"
    return names


def load_onnx(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
              *, source: str | None = None) -> ImportedModel:
    """Import an ONNX file: read, pin, normalise, check ops, convert.

    The reference runs ONNX Runtime on the original file (with the pinned input shapes).
    """
    path = Path(path)
    label = str(path)
    model = read_onnx(path)
    inputs = onnx_inputs(model)
    names = [i.name for i in inputs]
    dtypes = [_onnx_dtype(i) for i in inputs]
    shapes, pinned = normalise_onnx(model, input_shapes, label)
    reference = OnnxReference(pinned if pinned is not None else path, names)
    check_onnx_ops(model, label)
    mod = onnx_to_relax(model, dict(zip(names, shapes, strict=True)),
                        dict(zip(names, dtypes, strict=True)), label)
    return ImportedModel(mod=mod, input_names=names, input_shapes=shapes, input_dtypes=dtypes,
                         output_names=[o.name for o in model.graph.output],
                         source=source or f"ONNX file {path}", path=path, runner=reference,
                         layer_names=layer_names(model, mod))
