"""What an import gives: the model in Relax form, and a way to run the original (ONNX Runtime
or torch) as the reference a split must match."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch.utils import _pytree

from splitc import optional
from splitc.errors import SplitcError


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
    #: binding name in ``main`` -> the layer's name in the original model, where known (ONNX
    #: convolutions and pools); pictures and timelines say these
    layer_names: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

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
            ort = optional.onnxruntime()
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
        with torch.no_grad():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [t.detach().cpu().numpy() for t in _pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor)]
