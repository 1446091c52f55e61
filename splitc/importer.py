"""Model → Relax IRModule: zoo names, ONNX files, torch.export ``.pt2`` files and factories.

:func:`load` is the one entry point. Whatever the source, the result is an
:class:`ImportedModel` whose ``mod["main"]`` has static shapes, weights bound as constants and
batch norms folded into the convolutions before them and ``FoldConstant`` applied (the form
:mod:`splitc.passes` expect), plus a way to run the
*original* model (ONNX Runtime or torch) as the reference a split must match.

ONNX files are normalised before TVM sees them, because TVM 0.27's ONNX importer trips on
real exported files with dynamic shapes (``Shape → Gather → Concat → Reshape`` chains,
``Resize`` with computed sizes, ``Range`` over a dimension):

1. pin every dynamic input dimension from ``input_shapes`` (an unpinned one is an error);
2. ONNX shape inference;
3. fold constant subgraphs to a fixpoint: ``Shape``/``Size`` of a statically shaped tensor
   becomes a constant, and any node whose inputs are all constants is evaluated with
   ``onnx.reference`` and replaced by an initializer;
4. shape inference again.

Zoo models are exported to ONNX once (cached under ``$SPLITC_CACHE/zoo`` or
``~/.cache/splitc/zoo``) and imported through the same path as user files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax

from splitc import zoo
from splitc.errors import SplitcError

#: ``package.module:factory``
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
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
#: Cap on how much of a wrapped error message is repeated to the user.
MAX_MESSAGE_CHARS = 1500


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class ImportedModel:
    """A model in Relax form plus a way to run the original.

    Attributes
    ----------
    mod : tvm.IRModule
        ``main`` takes the inputs in :attr:`input_names` order; weights are bound constants and
        ``FoldConstant`` has run. Relax parameter names may be sanitised versions of the ONNX
        input names (``input.1`` → ``input_1``).
    input_names : list of str
        Input names of the original model (ONNX graph inputs, or ``forward`` arguments).
    input_shapes : list of tuple of int
        Static input shapes, in input order.
    input_dtypes : list of str
        Input dtypes (numpy names such as ``"float32"``), in input order.
    output_names : list of str
        ONNX output names, or ``["output"]`` (``output_0``, ``output_1``, ... for several
        outputs) for torch sources.
    source : str
        What was imported, for logs.
    path : Path or None
        The file actually imported (the cached ONNX export for zoo models).
    """

    mod: tvm.IRModule
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    output_names: list[str]
    source: str
    path: Path | None = None
    runner: Callable[[list[np.ndarray]], list[np.ndarray]] = field(
        default=None, repr=False, compare=False)

    def reference(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the ORIGINAL model (ONNX Runtime or torch) on ``inputs``.

        Parameters
        ----------
        inputs : sequence of numpy.ndarray
            One array per input, in :attr:`input_names` order, with the imported shapes.

        Returns
        -------
        list of numpy.ndarray
            The outputs, in :attr:`output_names` order.
        """
        arrays = [np.asarray(x) for x in inputs]
        if len(arrays) != len(self.input_names):
            raise SplitcError(f"{self.source} takes {len(self.input_names)} inputs "
                              f"({', '.join(self.input_names)}), got {len(arrays)}")
        for name, shape, x in zip(self.input_names, self.input_shapes, arrays, strict=True):
            if tuple(x.shape) != shape:
                raise SplitcError(f"input {name!r} must have shape {list(shape)}, "
                                  f"got {list(x.shape)}")
        arrays = [x.astype(d, copy=False) for x, d in zip(arrays, self.input_dtypes,
                                                          strict=True)]
        return self.runner(arrays)

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Seeded standard-normal inputs of the imported shapes and dtypes."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s).astype(d) for s, d in
                zip(self.input_shapes, self.input_dtypes, strict=True)]


class OnnxReference:
    """Runs an ONNX model with ONNX Runtime on the CPU; the session is created on first use.

    Parameters
    ----------
    model : Path or bytes
        The model file, or the serialised model (when pinning changed it).
    input_names : list of str
        Graph input names, in order.
    """

    def __init__(self, model: Path | bytes, input_names: list[str]) -> None:
        self._model = model
        self._input_names = input_names
        self._session = None

    def session(self):
        """The cached ``onnxruntime.InferenceSession``."""
        if self._session is None:
            import onnxruntime as ort

            model = str(self._model) if isinstance(self._model, Path) else self._model
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: no "initializer in graph inputs" noise
            self._session = ort.InferenceSession(model, options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feeds = dict(zip(self._input_names, inputs, strict=True))
        return [np.asarray(y) for y in self.session().run(None, feeds)]


class TorchReference:
    """Runs a torch module (or an ExportedProgram's module) under ``no_grad``."""

    def __init__(self, module: Callable[..., Any]) -> None:
        self._module = module

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch
        from torch.utils import _pytree

        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [t.detach().cpu().numpy() for t in _pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load(spec: str, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
         tiny: bool = False) -> ImportedModel:
    """Import a model into Relax.

    Parameters
    ----------
    spec : str
        A zoo model name (:func:`splitc.zoo.names`), a path to an ``.onnx`` file, a path to a
        ``.pt2`` file (a saved ``torch.export.ExportedProgram``), or ``package.module:factory``
        naming a callable that returns a ``torch.nn.Module``.
    input_shapes : mapping of str to tuple of int, optional
        Static shapes by input name. Required for every dynamic ONNX/pt2 dimension and for
        factories (keyed by ``forward`` argument names). For zoo models the key is ``input``
        and the shape selects the batch and image size.
    tiny : bool
        Zoo models only: the :data:`splitc.zoo.TINY` variant.

    Returns
    -------
    ImportedModel

    Raises
    ------
    SplitcError
        Missing or unreadable file, unknown name, unsupported operators, bad or missing input
        shapes, or a failure inside TVM's importer (wrapped with the file name).
    """
    shapes = _normalise_shape_arg(input_shapes)
    path = Path(spec).expanduser()
    if spec in zoo.MODELS and not path.is_file():
        return load_zoo(spec, shapes, tiny=tiny)
    if path.exists():
        _require_not_tiny(spec, tiny)
        return _load_file(path, shapes)
    if FACTORY_RE.match(spec):
        _require_not_tiny(spec, tiny)
        return load_factory(spec, shapes)
    if path.suffix.lower() in (".onnx", ".pt2") or os.sep in spec:
        raise SplitcError(f"model file {spec} does not exist")
    raise SplitcError(f"unknown model {spec!r}: not a file, not a zoo model (known: "
                      f"{', '.join(zoo.names())}), and not a package.module:factory reference")


def _load_file(path: Path, shapes: dict[str, tuple[int, ...]] | None) -> ImportedModel:
    """Dispatch an existing file on its suffix."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise SplitcError(f"{path} is a folder, not a model file (.onnx or .pt2)")
    if suffix == ".onnx":
        return load_onnx(path, shapes)
    if suffix == ".pt2":
        return load_pt2(path, shapes)
    raise SplitcError(f"{path}: unsupported model file type {suffix or '(no suffix)'!r}; "
                      "expected .onnx or .pt2 (a saved torch.export ExportedProgram); for "
                      "another torch model use package.module:factory")


def _require_not_tiny(spec: str, tiny: bool) -> None:
    if tiny:
        raise SplitcError(f"--tiny applies to zoo models only, not to {spec!r}")


def _normalise_shape_arg(shapes: Mapping[str, Sequence[int]] | None
                         ) -> dict[str, tuple[int, ...]] | None:
    """Validate the ``input_shapes`` argument: names to tuples of positive ints."""
    if not shapes:
        return None
    out = {}
    for name, dims in shapes.items():
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise SplitcError(f"input shape for {name!r} must be a sequence of integers, "
                              f"got {dims!r}") from None
        if any(d <= 0 for d in shape):
            raise SplitcError(f"input shape for {name!r} must have positive dims, "
                              f"got {list(shape)}")
        out[str(name)] = shape
    return out


# --------------------------------------------------------------------------------------------
# Input shapes, shared by every source
# --------------------------------------------------------------------------------------------

#: A declared dimension: a static size, a symbolic name, or None (unknown).
Dim = int | str | None


def resolve_input_shapes(label: str, declared: Sequence[tuple[str, Sequence[Dim] | None]],
                         given: Mapping[str, tuple[int, ...]] | None
                         ) -> list[tuple[int, ...]]:
    """Combine declared input dims with user-given shapes into static shapes.

    Parameters
    ----------
    label : str
        The model, for messages.
    declared : sequence of (name, dims or None)
        Each input's declared dims (``None`` = unknown rank; a str or None dim is dynamic).
    given : mapping, optional
        User shapes by input name.

    Returns
    -------
    list of tuple of int
        One static shape per declared input.

    Raises
    ------
    SplitcError
        A given name that is not an input, a rank or static-size mismatch, or a dynamic
        dimension left unpinned (naming the input and the dimension).
    """
    given = dict(given or {})
    names = [n for n, _ in declared]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise SplitcError(f"{label}: no input named {', '.join(map(repr, unknown))}; "
                          f"the model's inputs are: {', '.join(names)}")
    return [_resolve_one(label, name, dims, given.get(name)) for name, dims in declared]


def _resolve_one(label: str, name: str, dims: Sequence[Dim] | None,
                 shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Static shape of one input (see :func:`resolve_input_shapes`)."""
    example = f"(CLI: --input-shape {name}={_example_dims(dims)})"
    if shape is None:
        if dims is None:
            raise SplitcError(f"{label}: input {name!r} has an unknown rank; give its shape "
                              f"{example}")
        dynamic = [f"{i} ({d!r})" if isinstance(d, str) else str(i)
                   for i, d in enumerate(dims) if not isinstance(d, int)]
        if dynamic:
            raise SplitcError(
                f"{label}: input {name!r} has dynamic dimension(s) {', '.join(dynamic)} "
                f"(shape {_fmt_dims(dims)}); pin them with input_shapes={{{name!r}: (...)}} "
                f"{example}")
        return tuple(int(d) for d in dims)
    if dims is not None:
        if len(dims) != len(shape):
            raise SplitcError(f"{label}: input {name!r} has rank {len(dims)} (shape "
                              f"{_fmt_dims(dims)}), but the given shape {list(shape)} has rank "
                              f"{len(shape)}")
        for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(d, int) and d != s:
                raise SplitcError(f"{label}: input {name!r} dimension {i} is fixed at {d} "
                                  f"(shape {_fmt_dims(dims)}); the given shape {list(shape)} "
                                  f"says {s}")
    return shape


def _example_dims(dims: Sequence[Dim] | None) -> str:
    """``1,3,<height>,<width>``-style placeholder for a CLI hint."""
    if dims is None:
        return "D1,D2,..."
    return ",".join(str(d) if isinstance(d, int) else f"<{d or f'dim{i}'}>"
                    for i, d in enumerate(dims))


def _fmt_dims(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# --------------------------------------------------------------------------------------------
# Zoo
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where zoo exports are cached: ``$SPLITC_CACHE/zoo`` or ``~/.cache/splitc/zoo``."""
    root = os.environ.get("SPLITC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "splitc") / "zoo"


def zoo_onnx_path(name: str, *, tiny: bool = False, image_size: int | None = None,
                  batch: int = 1, opset: int = 17) -> Path:
    """The cached ONNX export of a zoo model, exported now if missing.

    The file name holds every option plus a fingerprint of the zoo source and the torch
    version, so an edit to :mod:`splitc.zoo` never serves a stale export.
    """
    import torch

    cfg = zoo.resolve(name, tiny=tiny, image_size=image_size)
    fingerprint = hashlib.sha256(Path(zoo.__file__).read_bytes()
                                 + torch.__version__.encode()).hexdigest()[:12]
    size = f"-{cfg.image_size}px" if cfg.image_size else ""
    stem = f"{name}{'-tiny' if tiny else ''}{size}-b{batch}-opset{opset}-{fingerprint}"
    path = cache_dir() / f"{stem}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            zoo.export_onnx(name, tmp, tiny=tiny, image_size=cfg.image_size, opset=opset,
                            batch=batch)
            os.replace(tmp, path)  # atomic: concurrent loads never see half a file
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return path


def load_zoo(name: str, input_shapes: Mapping[str, tuple[int, ...]] | None = None, *,
             tiny: bool = False) -> ImportedModel:
    """Export zoo model ``name`` to ONNX (cached) and import that file.

    ``input_shapes`` may give ``{"input": shape}``: batch and (for CNNs/ViT) the image size.
    """
    spec = zoo.get(name)
    default = zoo.input_shape(name, tiny=tiny)
    shape = tuple((input_shapes or {}).get("input", default))
    if input_shapes and set(input_shapes) != {"input"}:
        raise SplitcError(f"zoo model {name} has one input, 'input'; got shapes for "
                          f"{', '.join(map(repr, input_shapes))}")
    image_size = None
    if spec.is_image:
        if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
            raise SplitcError(f"zoo model {name} takes input shape (batch, 3, S, S), e.g. "
                              f"{list(default)}; got {list(shape)}")
        image_size = shape[2]
    elif shape[1:] != default[1:] or len(shape) != len(default):
        raise SplitcError(f"zoo model {name} takes input shape (batch, {default[1]}); "
                          f"got {list(shape)}")
    path = zoo_onnx_path(name, tiny=tiny, image_size=image_size, batch=shape[0])
    variant = "tiny " if tiny else ""
    return load_onnx(path, {"input": shape},
                     source=f"zoo model {name} ({variant}input {list(shape)}) via {path.name}")


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


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
                          f"{_short(e)})") from None
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
        raise SplitcError(f"{label}: ONNX shape inference failed: {_short(e)}") from None
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
                   label: str = "model") -> list[tuple[int, ...]]:
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
    list of tuple of int
        The static input shapes, one per real input.
    """
    shapes, _ = pin_inputs(model, input_shapes, label)
    sums_to_adds(model)
    fold_constants(model, label)
    infer_shapes(model, label)
    return shapes


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
                          f"{_short(e)}") from e
    return _finish_relax(mod, label)


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
    shapes, changed = pin_inputs(model, input_shapes, label)
    reference = OnnxReference(model.SerializeToString() if changed else path, names)
    sums_to_adds(model)
    fold_constants(model, label)
    infer_shapes(model, label)
    check_onnx_ops(model, label)
    mod = onnx_to_relax(model, dict(zip(names, shapes, strict=True)),
                        dict(zip(names, dtypes, strict=True)), label)
    return ImportedModel(mod=mod, input_names=names, input_shapes=shapes, input_dtypes=dtypes,
                         output_names=[o.name for o in model.graph.output],
                         source=source or f"ONNX file {path}", path=path, runner=reference)


# --------------------------------------------------------------------------------------------
# torch: .pt2 files and factories
# --------------------------------------------------------------------------------------------


def _torch_dtype_name(dtype) -> str:
    import torch

    return str(torch.empty((), dtype=dtype).numpy().dtype)


def _placeholder_info(ep) -> list[tuple[str, list[Dim] | None, str]]:
    """(name, dims, dtype) of an ExportedProgram's user inputs; symbolic dims as str."""
    import torch

    user = list(ep.graph_signature.user_inputs)
    meta = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    info = []
    for name in user:
        val = meta.get(name)
        if not isinstance(val, torch.Tensor):
            raise SplitcError(f"input {name!r} is not a tensor ({type(val).__name__}); only "
                              "tensor inputs are supported")
        dims: list[Dim] = [int(d) if isinstance(d, int) else str(d) for d in val.shape]
        info.append((name, dims, _torch_dtype_name(val.dtype)))
    return info


def _example_args(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen).to(getattr(torch, d))
                 for s, d in zip(shapes, dtypes, strict=True))


def _export(module, args: tuple, label: str):
    """``torch.export.export`` with failures as :class:`SplitcError`."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args)
    except Exception as e:
        raise SplitcError(f"torch.export failed for {label}: {type(e).__name__}: "
                          f"{_short(e)}") from e


def exported_to_relax(ep, label: str) -> tvm.IRModule:
    """``from_exported_program`` (weights bound, unit tuples unwrapped) + ``FoldConstant``."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise SplitcError(f"TVM could not import {label}: {type(e).__name__}: "
                          f"{_short(e)}") from e
    return _finish_relax(mod, label)


def _torch_output_names(mod: tvm.IRModule) -> list[str]:
    ret = mod["main"].ret_ty
    if isinstance(ret, relax.TupleType):
        return [f"output_{i}" for i in range(len(ret.fields))]
    return ["output"]


def load_pt2(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]] | None = None
             ) -> ImportedModel:
    """Import a saved ``torch.export.ExportedProgram``.

    Dynamic dimensions must be pinned by ``input_shapes``; the program is then re-exported
    with those static shapes. The reference runs the program's module in torch.
    """
    import torch

    path = Path(path)
    label = str(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise SplitcError(f"{path} is not a readable torch.export .pt2 file (not a zip "
                          "archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
    except FileNotFoundError:
        raise SplitcError(f"model file {path} does not exist") from None
    except Exception as e:
        raise SplitcError(f"{path} is not a readable torch.export .pt2 file "
                          f"({type(e).__name__}: {_short(e)})") from None
    info = _placeholder_info(ep)
    shapes = resolve_input_shapes(label, [(n, d) for n, d, _ in info], input_shapes)
    names, dtypes = [n for n, _, _ in info], [t for _, _, t in info]
    module = ep.module()
    if any(tuple(d) != s for (_, d, _), s in zip(info, shapes, strict=True)):
        ep = _export(module, _example_args(shapes, dtypes), label)
    mod = exported_to_relax(ep, label)
    return ImportedModel(mod=mod, input_names=names, input_shapes=shapes, input_dtypes=dtypes,
                         output_names=_torch_output_names(mod),
                         source=f"torch.export file {path}", path=path,
                         runner=TorchReference(module))


def resolve_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``package.module:factory`` (cwd importable), or SplitcError."""
    module_name, _, attr = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise SplitcError(f"cannot import module {module_name!r} (from {spec!r}): "
                          f"{type(e).__name__}: {_short(e)}") from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if factory is None:
        raise SplitcError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
    if not callable(factory):
        raise SplitcError(f"{spec} is not callable")
    return factory


def _forward_input_names(model, given: Mapping[str, tuple[int, ...]], spec: str) -> list[str]:
    """Input names in call order: ``forward``'s positional arguments that ``given`` names."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return list(given)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return list(given)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    required = [p.name for p in positional if p.default is p.empty]
    unknown = [n for n in given if n not in names]
    missing = [n for n in required if n not in given]
    if unknown or missing:
        raise SplitcError(f"{spec}: forward takes {', '.join(names) or 'no inputs'}; "
                          f"input shapes were given for {', '.join(given)}"
                          + (f" (missing: {', '.join(missing)})" if missing else ""))
    chosen = names[:len(given)]
    if set(chosen) != set(given):
        raise SplitcError(f"{spec}: give shapes for the first {len(given)} forward arguments "
                          f"({', '.join(chosen)}), got {', '.join(given)}")
    return chosen


def load_factory(spec: str, input_shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> ImportedModel:
    """Import ``package.module:factory``: call it, ``torch.export`` the module, convert.

    Inputs are float32 with the shapes in ``input_shapes`` (keyed by ``forward`` argument
    names; required). The reference runs the module itself in torch.
    """
    import torch

    factory = resolve_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise SplitcError(f"{spec}() failed: {type(e).__name__}: {_short(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise SplitcError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    if not input_shapes:
        try:
            args = [p for p in inspect.signature(model.forward).parameters]
        except (TypeError, ValueError):
            args = []
        first = args[0] if args else "x"
        raise SplitcError(f"{spec}: give the input shape(s), e.g. input_shapes={{{first!r}: "
                          f"(1, 3, 224, 224)}} (CLI: --input-shape {first}=1,3,224,224); "
                          f"forward takes: {', '.join(args) or '?'}")
    names = _forward_input_names(model, input_shapes, spec)
    shapes = [tuple(input_shapes[n]) for n in names]
    dtypes = ["float32"] * len(names)
    ep = _export(model, _example_args(shapes, dtypes), spec)
    mod = exported_to_relax(ep, spec)
    return ImportedModel(mod=mod, input_names=names, input_shapes=shapes, input_dtypes=dtypes,
                         output_names=_torch_output_names(mod), source=f"torch factory {spec}",
                         runner=TorchReference(model))


# --------------------------------------------------------------------------------------------
# Relax post-processing
# --------------------------------------------------------------------------------------------


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


def _finish_relax(mod: tvm.IRModule, label: str) -> tvm.IRModule:
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
                          f"{_short(e)}") from e
    dynamic = dynamic_bindings(mod["main"])
    if dynamic:
        shown = "; ".join(f"{name}: {ty}" for name, ty in dynamic[:3])
        raise SplitcError(f"{label}: after import, {len(dynamic)} tensor(s) still have dynamic "
                          f"shapes ({shown}); splitc needs static shapes (pin the inputs, or "
                          "the model computes a data-dependent shape)")
    return mod


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


def _short(e: BaseException | str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message cut to ``limit`` characters (head and tail kept)."""
    text = str(e).strip()
    if len(text) <= limit:
        return text
    return text[: limit // 3] + " ... " + text[-(2 * limit) // 3:]
