"""torch sources → Relax: ``.pt2`` files (a saved ``torch.export.ExportedProgram``) and
``package.module:factory`` references, through ``torch.export`` and TVM's exported-program
importer."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import tvm
from tvm import relax

from splitc.errors import SplitcError, short_message
from splitc.frontend.model import ImportedModel, TorchReference
from splitc.frontend.relax_cleanup import finish_relax
from splitc.frontend.shapes import Dim, resolve_input_shapes

#: ``package.module:factory``
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _torch_dtype_name(dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype)


def _placeholder_info(ep) -> list[tuple[str, list[Dim] | None, str]]:
    """(name, dims, dtype) of an ExportedProgram's user inputs; symbolic dims as str."""
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
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen).to(getattr(torch, d))
                 for s, d in zip(shapes, dtypes, strict=True))


def _export(module, args: tuple, label: str):
    """``torch.export.export`` with failures as :class:`SplitcError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args)
    except Exception as e:
        raise SplitcError(f"torch.export failed for {label}: {type(e).__name__}: "
                          f"{short_message(e)}") from e


def exported_to_relax(ep, label: str) -> tvm.IRModule:
    """``from_exported_program`` (weights bound, unit tuples unwrapped) + ``FoldConstant``."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise SplitcError(f"TVM could not import {label}: {type(e).__name__}: "
                          f"{short_message(e)}") from e
    return finish_relax(mod, label)


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
                          f"({type(e).__name__}: {short_message(e)})") from None
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
                          f"{type(e).__name__}: {short_message(e)}") from None
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
    factory = resolve_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise SplitcError(f"{spec}() failed: {type(e).__name__}: {short_message(e)}") from e
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
