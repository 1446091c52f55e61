"""The frontend: model → Relax IRModule, from zoo names, ONNX files, torch.export ``.pt2``
files and factories.

:func:`load` (:mod:`.load`) is the one entry point. Whatever the source, the result is an
:class:`ImportedModel` (:mod:`.model`) whose ``mod["main"]`` has static shapes, weights bound
as constants, batch norms folded into the convolutions before them and ``FoldConstant``
applied (the form the split passes expect; :mod:`.relax_cleanup`), plus a way to run the
*original* model (ONNX Runtime or torch) as the reference a split must match. Sources:
:mod:`.onnx_import`, :mod:`.torch_import`, the models built in code (:mod:`.zoo`); input
shapes are resolved in :mod:`.shapes`, training data read in :mod:`.data`.

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

from splitc.frontend.load import load
from splitc.frontend.model import ImportedModel

__all__ = ["ImportedModel", "load"]
