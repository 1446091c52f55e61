"""The one entry point, :func:`load`: a zoo name, an ONNX or ``.pt2`` file, or a factory
reference, dispatched to its importer; zoo models are exported to ONNX once and cached."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from splitc import cache_root
from splitc.errors import SplitcError
from splitc.frontend import zoo
from splitc.frontend.model import ImportedModel
from splitc.frontend.onnx_import import load_onnx
from splitc.frontend.shapes import normalise_shape_arg
from splitc.frontend.torch_import import FACTORY_RE, load_factory, load_pt2


def load(spec: str, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
         tiny: bool = False) -> ImportedModel:
    """Import a model into Relax.

    Parameters
    ----------
    spec : str
        A zoo model name (:func:`~.zoo.names`), a path to an ``.onnx`` file, a path to a
        ``.pt2`` file (a saved ``torch.export.ExportedProgram``), or ``package.module:factory``
        naming a callable that returns a ``torch.nn.Module``.
    input_shapes : mapping of str to tuple of int, optional
        Static shapes by input name. Required for every dynamic ONNX/pt2 dimension and for
        factories (keyed by ``forward`` argument names). For zoo models the key is ``input``
        and the shape selects the batch and image size.
    tiny : bool
        Zoo models only: the :data:`splitc.frontend.zoo.TINY` variant.

    Returns
    -------
    ImportedModel

    Raises
    ------
    SplitcError
        Missing or unreadable file, unknown name, unsupported operators, bad or missing input
        shapes, or a failure inside TVM's importer (wrapped with the file name).
    """
    shapes = normalise_shape_arg(input_shapes)
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


def cache_dir() -> Path:
    """Where zoo exports are cached: ``$SPLITC_CACHE/zoo`` or ``~/.cache/splitc/zoo``."""
    return cache_root() / "zoo"


def zoo_onnx_path(name: str, *, tiny: bool = False, image_size: int | None = None,
                  batch: int = 1, opset: int = 17) -> Path:
    """The cached ONNX export of a zoo model, exported now if missing.

    The file name holds every option plus a fingerprint of the zoo source and the torch
    version, so an edit to :mod:`splitc.frontend.zoo` never serves a stale export.
    """
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
