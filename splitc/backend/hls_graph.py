"""An FPGA piece as hls4ml will build it, and what it needs on the fabric (estimates).

:func:`piece_graph` reads a piece's Relax function into a list of hls4ml-shaped layers —
convolutions (grouped and depthwise included), pooling, ReLU / sigmoid / tanh, residual adds,
flattening and dense layers — **channels last**, as hls4ml's streaming layers hold feature
maps: a Relax tensor ``[1, C, H, W]`` is stored ``[H, W, C]``. Weights are re-laid out to
match (convolution kernels OIHW -> HWIO; the rows of a dense layer that reads a flattened map
are permuted from C-H-W to H-W-C order), and the piece's input and output carry a
:class:`Layout` that says how the worker turns the plan's NCHW tensors into the flat
channels-last vectors the C simulation reads and writes, and back.

:func:`estimate` prices a graph on a fabric without hls4ml (``auto`` prices candidate splits
with it) and :func:`choose_reuse` picks per-layer reuse factors: the smallest streaming
interval whose multipliers fit the DSP slices and whose memories fit the block RAM. The
model, in one place (every figure is an **estimate**, not a synthesis result; Vivado is not
available here, so nothing below was checked against a synthesis report)::

    multipliers  = ceil(products per output pixel / reuse factor)      (a dense layer: per call)
    DSP slices   = multipliers x (0 below 10 bits: LUTs; 1 up to 18 bits; 2 above: DSP48 is 25x18)
    LUTs         = multipliers below 10 bits x bits^2 (a multiplier built of LUTs; the rest of
                   the logic is not estimated)
    BRAM36       = weight memories (Resource strategy: reuse-factor words deep)
                 + stream FIFOs (io_stream: one per tensor and per consumer of a shared tensor,
                   hls4ml's default depth = the map's pixels, one pixel per word; the output
                   layers' words are OUTPUT_EXTRA_BITS wider)
                   where a memory shallower than 64 words is left to LUTs
    cycles       = per layer: pixels read x initiation interval (reuse factor for
                   convolutions, 1 for the rest); the input and output streams move one value
                   a cycle (the 32-bit AXI stream); layers overlap (HLS dataflow): a layer
                   starts when its producer's first output arrives (after its line buffer
                   fills) and ends no sooner than its producer's end plus its own tail
    latency      = cycles / clock + the per-call overhead

A dense-only piece keeps hls4ml's ``io_parallel`` and the simpler sum the dense path has
always used (reuse + adder tree + registers per layer, plus the DMA of its inputs and outputs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tvm import relax

from splitc.errors import SplitcError
from splitc.passes.ir import main_block, op_name, static_shape

#: Activations the fabric takes, by Relax op -> hls4ml's activation name.
ACTIVATIONS = {"nn.relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
#: Layers that multiply (their reuse factor is chosen; the rest run at one item a cycle).
COMPUTE = ("conv2d", "depthwise2d", "dense")
#: Integer bits the piece's output layers get beyond the precision's (same fraction): their
#: result leaves the fabric as float, and a classifier's logits routinely exceed the range
#: its hidden activations need (a digits MLP's reach 41 where ap_fixed<16,6> holds +-32).
OUTPUT_EXTRA_BITS = 8
#: A memory shallower than this many words is built from LUTs / shift registers, not BRAM.
SHALLOW_WORDS = 64
#: 18 Kb block RAM shapes (depth, width); a BRAM36 is two of them.
BRAM18_SHAPES = ((512, 36), (1024, 18), (2048, 9), (4096, 4), (8192, 2), (16384, 1))


@dataclass(frozen=True)
class Layout:
    """How a tensor of the plan (NCHW, batch 1) lies in the fabric's flat vector.

    ``stored`` is the shape hls4ml holds (channels last, no batch); ``order`` the axes that
    take the plan's tensor, viewed with ``stored``'s rank, to it:
    ``stored = logical.reshape(view).transpose(order)``. A map ``[1, C, H, W]`` is stored
    ``[H, W, C]`` with order ``(1, 2, 0)``; a vector is stored as is."""

    stored: tuple[int, ...]
    order: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.stored)

    def to_json(self) -> dict:
        return {"stored": list(self.stored), "order": list(self.order)}


@dataclass
class Layer:
    """One hls4ml layer of a piece. ``out``: its output as stored (channels last)."""

    name: str
    op: str  # input conv2d depthwise2d dense max_pool2d avg_pool2d zero_pad global_avg_pool
    #          act add flatten
    inputs: tuple[str, ...]
    out: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    weight: np.ndarray | None = None  # hls4ml's layout (HWIO, HW-C-multiplier, [in, out])
    bias: np.ndarray | None = None
    weight_shape: tuple[int, ...] = ()  # known before the values are (pricing needs no values)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.attrs["in_shape"]

    @property
    def products(self) -> int:
        """Multiplications per output pixel (per call for a dense layer)."""
        if self.op == "conv2d":
            fh, fw, cin, cout = self.weight_shape
            return fh * fw * cin * cout
        if self.op == "depthwise2d":
            fh, fw, c, m = self.weight_shape
            return fh * fw * c * m
        if self.op == "dense":
            return self.weight_shape[0] * self.weight_shape[1]
        return 0

    @property
    def mult_size(self) -> tuple[int, int]:
        """(n_in, n_out) as hls4ml sizes the layer's multiplication (its reuse factors)."""
        if self.op in ("conv2d", "depthwise2d"):
            fh, fw = self.weight_shape[:2]
            return fh * fw * self.in_shape[-1], self.out[-1]
        return self.weight_shape[0], self.weight_shape[1]

    @property
    def items(self) -> int:
        """What the layer reads per inference, one item per initiation interval: input pixels
        (after padding) for streaming layers, one vector for a dense layer."""
        if self.op == "dense":
            return 1
        if self.op in ("conv2d", "depthwise2d"):
            pt, pb, pl, pr = self.attrs["pad"]
            h, w, _ = self.in_shape
            return (h + pt + pb) * (w + pl + pr)
        if self.op == "input":
            return math.prod(self.out)  # one value a cycle off the AXI stream
        shape = self.in_shape
        return math.prod(shape[:-1]) if len(shape) == 3 else 1


@dataclass
class PieceGraph:
    """A piece's layers in order (the first is the input), its input and output layouts."""

    piece: str
    layers: list[Layer]
    input: Layout
    output: Layout
    notes: list[str] = field(default_factory=list)  # what was rewritten to fit hls4ml

    @property
    def hidden(self) -> list[str]:
        """The Relax names of the tensors held at the precision (the input's and the hidden
        layers'; not the output layers', see :attr:`tail`)."""
        tail = self.tail
        return [layer.attrs["var"] for layer in self.layers if layer.name not in tail]

    @property
    def streaming(self) -> bool:
        """Feature maps inside: hls4ml's io_stream (else io_parallel, dense layers only)."""
        return any(len(layer.out) == 3 for layer in self.layers)

    @property
    def io_type(self) -> str:
        return "io_stream" if self.streaming else "io_parallel"

    @property
    def compute(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.op in COMPUTE]

    @property
    def tail(self) -> set[str]:
        """The output layers: the last convolution or dense layer and what follows it (they
        get :data:`OUTPUT_EXTRA_BITS` more integer bits); all layers of a piece that only
        pools."""
        last = max((i for i, layer in enumerate(self.layers) if layer.op in COMPUTE),
                   default=1)  # no multiplying layer: everything but the input
        return {layer.name for layer in self.layers[last:]}

    def consumers(self) -> dict[str, int]:
        n = {layer.name: 0 for layer in self.layers}
        for layer in self.layers:
            for i in layer.inputs:
                n[i] += 1
        n[self.layers[-1].name] += 1  # the output stream
        return n

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for layer in self.layers[1:]:
            kinds[layer.op] = kinds.get(layer.op, 0) + 1
        return ", ".join(f"{n} {op}" for op, n in kinds.items())


def _nonneg(layer: Layer) -> bool:
    """Whether the layer's output is never negative (a ReLU's, and pooling or adding such)."""
    return bool(layer.attrs.get("nonneg"))


def _ident(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out[:1].isalpha() else f"t_{out}"


def _ints(values) -> list[int]:
    return [int(v) for v in values]


class _Reader:
    """Walks a piece's bindings, building its layers (see :func:`piece_graph`)."""

    def __init__(self, func: relax.Function, weights: list[np.ndarray] | None, piece: str):
        self.piece = piece
        n_inputs = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs \
            else 1
        if n_inputs != 1:
            raise SplitcError(f"FPGA piece {piece} reads {n_inputs} tensors; the hls4ml path "
                              "takes one input: keep this part on a CPU device")
        self.params: dict[str, tuple[int, ...]] = {p.name: static_shape(p)
                                                   for p in func.params[n_inputs:]}
        self.values = dict(zip(self.params, weights, strict=True)) if weights is not None \
            else None
        self.layers: list[Layer] = []
        self.notes: list[str] = []
        #: Relax var name -> ("layer", layer name) | ("param", param name, transposed)
        self.env: dict[str, tuple] = {}
        #: layer name -> the CHW shape its vector was flattened from (H, W, C stored)
        self.flat_from: dict[str, tuple[int, int, int]] = {}
        self.biased: set[str] = set()
        x = func.params[0]
        shape = static_shape(x)
        if len(shape) == 4 and shape[0] == 1:
            _, c, h, w = shape
            self.input = Layout((h, w, c), (1, 2, 0))
        elif len(shape) == 2 and shape[0] == 1:
            self.input = Layout((shape[1],), (0,))
        else:
            raise SplitcError(f"FPGA piece {piece}: its input {x.name} has shape {list(shape)}; "
                              "the hls4ml path takes [1, C, H, W] feature maps or [1, N] "
                              "vectors")
        self._add(Layer("input_1", "input", (), self.input.stored), x.name)

    # -- helpers -------------------------------------------------------------------------
    def _add(self, layer: Layer, var: str) -> Layer:
        layer.attrs.setdefault("var", var)
        self.layers.append(layer)
        self.env[var] = ("layer", layer.name)
        return layer

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def value(self, param: str) -> np.ndarray | None:
        if self.values is None:
            return None
        return np.asarray(self.values[param], dtype=np.float32)

    def refuse(self, what: str, var: str) -> SplitcError:
        return SplitcError(
            f"FPGA piece {self.piece}: {var} is {what}, which the hls4ml path does not take "
            "(it takes 2-D convolutions, max/average pooling in windows that do not overlap, "
            "ReLU/sigmoid/"
            "tanh, residual adds, flatten and dense layers): keep that part of the model on a "
            "CPU device")

    def tensor(self, arg, var: str) -> Layer:
        if not isinstance(arg, relax.Var) or arg.name not in self.env or \
                self.env[arg.name][0] != "layer":
            raise self.refuse("computed from an operand that is neither the piece's input "
                              "nor a layer's output", var)
        return self.layer(self.env[arg.name][1])

    def param(self, arg) -> tuple[str, bool] | None:
        if isinstance(arg, relax.Var):
            if arg.name in self.params:
                return arg.name, False
            entry = self.env.get(arg.name)
            if entry and entry[0] == "param":
                return entry[1], entry[2]
        return None

    # -- ops -----------------------------------------------------------------------------
    def read(self, b: relax.VarBinding) -> None:
        call, var = b.value, b.var.name
        name = op_name(call)
        if not isinstance(call, relax.Call):
            raise self.refuse(name, var)
        if name == "nn.conv2d":
            self.conv2d(call, var)
        elif name in ("nn.max_pool2d", "nn.avg_pool2d"):
            self.pool(call, var, name)
        elif name in ("mean", "nn.adaptive_avg_pool2d"):
            self.global_pool(call, var, name)
        elif name in ACTIVATIONS:
            src = self.tensor(call.args[0], var)
            self._add(Layer(_ident(var), "act", (src.name,), src.out,
                            {"activation": ACTIVATIONS[name], "in_shape": src.out,
                             "nonneg": name in ("nn.relu", "sigmoid")}), var)
        elif name == "add":
            self.add(call, var)
        elif name in ("reshape", "flatten"):
            self.flatten(call, b.var, var)
        elif name == "permute_dims" and self.param(call.args[0]) and \
                len(self.params[self.param(call.args[0])[0]]) == 2:
            p, transposed = self.param(call.args[0])
            self.env[var] = ("param", p, not transposed)
        elif name == "matmul":
            self.dense(call, var)
        else:
            raise self.refuse(name, var)

    def conv2d(self, call, var):
        a = call.attrs
        src = self.tensor(call.args[0], var)
        p = self.param(call.args[1])
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") or \
                p is None or p[1] or len(src.out) != 3:
            raise self.refuse("nn.conv2d with a computed kernel or another layout", var)
        if any(d != 1 for d in _ints(a.dilation)):
            raise self.refuse("a dilated nn.conv2d", var)
        h, w, cin = src.out
        cout, per_group, fh, fw = self.params[p[0]]
        groups = int(a.groups)
        pads = _ints(a.padding)
        pt, pl, pb, pr = pads if len(pads) == 4 else pads + pads
        sh, sw = _ints(a.strides)
        ho, wo = (h + pt + pb - fh) // sh + 1, (w + pl + pr - fw) // sw + 1
        attrs = {"in_shape": src.out, "kernel": (fh, fw), "stride": (sh, sw),
                 "pad": (pt, pb, pl, pr)}
        kernel = self.value(p[0])
        if groups == cin == cout and cin > 1:  # depthwise (hls4ml's streaming depthwise
            # layer takes a depth multiplier of 1 only; others go block-diagonal below)
            weight = None if kernel is None else kernel.reshape(cin, 1, fh, fw).transpose(
                2, 3, 0, 1)
            layer = Layer(_ident(var), "depthwise2d", (src.name,), (ho, wo, cout),
                          {**attrs, "multiplier": 1}, weight, weight_shape=(fh, fw, cin, 1))
        else:
            weight = None
            if kernel is not None:
                full = kernel
                if groups > 1:  # block-diagonal: group g reads only its own input channels
                    full = np.zeros((cout, cin, fh, fw), np.float32)
                    step_in, step_out = cin // groups, cout // groups
                    for g in range(groups):
                        full[g * step_out:(g + 1) * step_out,
                             g * step_in:(g + 1) * step_in] = \
                            kernel[g * step_out:(g + 1) * step_out]
                weight = full.transpose(2, 3, 1, 0)
            if groups > 1:
                self.notes.append(
                    f"{var}: a convolution in {groups} groups becomes one convolution with "
                    "block-diagonal weights (hls4ml 1.3 has no grouped convolution and no "
                    "channel slice for streams); its estimate counts the zeros' multipliers")
            layer = Layer(_ident(var), "conv2d", (src.name,), (ho, wo, cout),
                          {**attrs, "groups": groups}, weight,
                          weight_shape=(fh, fw, cin, cout))
        self._add(layer, var)

    def pool(self, call, var, name):
        a = call.attrs
        src = self.tensor(call.args[0], var)
        if a.layout != "NCHW" or len(src.out) != 3:
            raise self.refuse(f"{name} in layout {a.layout}", var)
        if bool(a.ceil_mode) or any(d != 1 for d in _ints(a.dilation)):
            raise self.refuse(f"{name} with ceil mode or dilation (hls4ml's streaming pooling "
                              "has neither)", var)
        ph, pw = _ints(a.pool_size)
        sh, sw = _ints(a.strides)
        if (ph, pw) != (sh, sw):
            raise self.refuse(f"{name} {ph}x{pw} with stride {sh}x{sw} (hls4ml's streaming "
                              "pooling takes windows that do not overlap: stride = size)", var)
        pads = _ints(a.padding)
        pt, pl, pb, pr = pads if len(pads) == 4 else pads + pads
        if any((pt, pl, pb, pr)):
            # hls4ml's pooling takes no padding, but zeros can be padded first: what a max
            # pads with (-inf) never wins over a non-negative input, and an average that
            # counts the padding counts zeros
            if "max" in name and not _nonneg(src):
                raise self.refuse(f"{name} with padding of a tensor that may be negative "
                                  "(zeros padded before the pooling would be what it picks)",
                                  var)
            if "avg" in name and not bool(a.count_include_pad):
                raise self.refuse(f"{name} with padding it does not count (hls4ml's streaming "
                                  "pooling has no padding)", var)
            h, w, c = src.out
            src = self._add(Layer(_ident(var) + "_pad", "zero_pad", (src.name,),
                                  (h + pt + pb, w + pl + pr, c),
                                  {"in_shape": src.out, "pad": (pt, pb, pl, pr),
                                   "nonneg": _nonneg(src)}), var)
        h, w, c = src.out
        out = ((h - ph) // sh + 1, (w - pw) // sw + 1, c)
        self._add(Layer(_ident(var), "max_pool2d" if "max" in name else "avg_pool2d",
                        (src.name,), out,
                        {"in_shape": src.out, "pool": (ph, pw), "stride": (sh, sw),
                         "nonneg": _nonneg(src)}), var)

    def global_pool(self, call, var, name):
        src = self.tensor(call.args[0], var)
        if len(src.out) != 3:
            raise self.refuse(name, var)
        if name == "mean":
            axes = sorted(int(x) % 4 for x in call.attrs.axis) if call.attrs.axis else []
            ok = axes == [2, 3]
        else:
            ok = call.attrs.output_size is not None and \
                _ints(call.attrs.output_size) in ([1, 1], [1]) and call.attrs.layout == "NCHW"
        if not ok:
            raise self.refuse(f"{name} other than a global average over height and width",
                              var)
        self._add(Layer(_ident(var), "global_avg_pool", (src.name,), (src.out[-1],),
                        {"in_shape": src.out}), var)

    def add(self, call, var):
        a, b = call.args
        pa, pb = self.param(a), self.param(b)
        if pa or pb:  # a bias: a per-channel constant added to a conv's or dense's output
            p, other = (pa, b) if pa else (pb, a)
            src = self.tensor(other, var)
            c = src.out[-1]
            shape = self.params[p[0]]
            if src.op not in COMPUTE or src.name in self.biased or math.prod(shape) != c or \
                    (len(shape) >= 3 and shape[-1] != 1 and len(src.out) == 3):
                raise self.refuse("an add of a constant that is not a layer's per-channel bias",
                                  var)
            value = self.value(p[0])
            src.bias = None if value is None else value.reshape(c)
            self.biased.add(src.name)
            self.env[var] = ("layer", src.name)
            return
        x, y = self.tensor(a, var), self.tensor(b, var)
        if x.out != y.out or self.flat_from.get(x.name) != self.flat_from.get(y.name):
            raise self.refuse(f"an add of tensors shaped {list(x.out)} and {list(y.out)}", var)
        layer = self._add(Layer(_ident(var), "add", (x.name, y.name), x.out,
                                {"in_shape": x.out, "nonneg": _nonneg(x) and _nonneg(y)}),
                          var)
        if x.name in self.flat_from:
            self.flat_from[layer.name] = self.flat_from[x.name]

    def flatten(self, call, out_var, var):
        src = self.tensor(call.args[0], var)
        shape = static_shape(out_var)
        if len(shape) != 2 or shape[0] != 1 or shape[1] != math.prod(src.out):
            raise self.refuse(f"a reshape to {list(shape)} (the hls4ml path flattens maps to "
                              "[1, N] only)", var)
        if len(src.out) == 1:  # already a vector ([1, C, 1, 1] pooled, or flat): nothing to do
            self.env[var] = ("layer", src.name)
            return
        h, w, c = src.out
        layer = self._add(Layer(_ident(var), "flatten", (src.name,), (h * w * c,),
                                {"in_shape": src.out}), var)
        if h * w > 1:
            self.flat_from[layer.name] = (h, w, c)

    def dense(self, call, var):
        src = self.tensor(call.args[0], var)
        p = self.param(call.args[1])
        if p is None or len(src.out) != 1 or len(self.params[p[0]]) != 2:
            raise self.refuse("a matmul that is not a vector times a weight matrix", var)
        shape = self.params[p[0]]
        n_in, n_out = (shape[1], shape[0]) if p[1] else shape
        if n_in != src.out[0]:
            raise self.refuse(f"a matmul of {src.out[0]} values by a {n_in}-row matrix", var)
        weight = self.value(p[0])
        if weight is not None:
            weight = weight.T if p[1] else weight
            hwc = self.flat_from.get(src.name)
            if hwc:  # the vector is stored H-W-C; the model's rows are C-H-W
                h, w, c = hwc
                weight = weight[np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0)
                                .reshape(-1)]
            weight = np.ascontiguousarray(weight)
        self._add(Layer(_ident(var), "dense", (src.name,), (n_out,), {"in_shape": src.out},
                        weight, weight_shape=(n_in, n_out)), var)

    def finish(self, out) -> PieceGraph:
        if not isinstance(out, relax.Var) or self.env.get(out.name, ("",))[0] != "layer":
            raise SplitcError(f"FPGA piece {self.piece} must return one tensor a layer makes")
        last = self.layer(self.env[out.name][1])
        if last.op == "input":
            raise SplitcError(f"FPGA piece {self.piece} computes nothing")
        if self.layers[-1] is not last:
            raise SplitcError(f"FPGA piece {self.piece}: its output {out.name} is not its last "
                              "layer; keep this part of the model on a CPU device")
        for layer in self.layers:
            if layer.op in COMPUTE and layer.bias is None:
                n = layer.out[-1]
                layer.bias = np.zeros(n, np.float32) if self.values is not None else None
        shape = static_shape(out)
        if len(last.out) == 3:
            output = Layout(last.out, (1, 2, 0))
        elif last.name in self.flat_from:
            h, w, c = self.flat_from[last.name]
            output = Layout((h, w, c), (1, 2, 0))
        else:
            output = Layout(last.out, (0,))
        if output.size != math.prod(shape):
            raise SplitcError(f"FPGA piece {self.piece}: output {out.name} {list(shape)} does "
                              f"not match its layer's {list(last.out)}")
        return PieceGraph(self.piece, self.layers, self.input, output, self.notes)

    @property
    def compute(self):
        return [layer for layer in self.layers if layer.op in COMPUTE]


def piece_graph(func: relax.Function, weights: list[np.ndarray] | None, piece: str
                ) -> PieceGraph:
    """The hls4ml layers of an FPGA piece (``func``: its Relax function, weights lifted into
    parameters after its one input; ``weights``: their values, or None when only pricing).
    Raises :class:`SplitcError` naming the first op the fabric does not take."""
    reader = _Reader(func, weights, piece)
    for b in main_block(tvm.IRModule({"main": func})).bindings:
        reader.read(b)
    body = func.body
    return reader.finish(body.body if isinstance(body, relax.SeqExpr) else body)


# -- estimates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fabric:
    """What an estimate needs of a part (from the target's ``fpga`` entry)."""

    part: str
    clock_mhz: float
    dsp: int
    bram36: int
    lut: int
    call_overhead_s: float
    dma_bytes_per_second: float

    @classmethod
    def of(cls, spec) -> Fabric:
        f = spec.fpga
        return cls(f["part"], f["clock_mhz"], f["dsp"], f["bram36"], f["lut"],
                   f.get("call_overhead_s", 0.0), spec.memory_bandwidth_gbs * 1e9)


@dataclass
class Estimate:
    """What a piece needs on the fabric. Estimates, not synthesis results."""

    layers: list[dict]  # per layer: name, op, shape, reuse, multipliers, dsp, bram36, cycles
    multipliers: int
    dsp: int
    bram36: int
    cycles: int  # one inference, first value in to last value out
    interval: int  # cycles between inferences when they stream back to back
    latency_s: float
    dsp_available: int
    bram36_available: int
    io_type: str = "io_parallel"
    lut: int = 0  # multipliers built of LUTs (below 10 bits); other logic not estimated
    lut_available: int = 0

    @property
    def fits(self) -> bool:
        return self.dsp <= self.dsp_available and self.bram36 <= self.bram36_available and \
            self.lut <= self.lut_available

    def short(self) -> str:
        luts = f"{self.lut:,} of {self.lut_available:,} LUT in multipliers, " if self.lut else ""
        return (f"{self.dsp} of {self.dsp_available} DSP, {self.bram36} of "
                f"{self.bram36_available} BRAM36, {luts}{self.cycles:,} cycles, "
                f"{self.latency_s * 1e3:.3f} ms")

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits, "label": "estimate, not a synthesis result"}


def dsp_per_multiplier(width: int) -> int:
    return 0 if width < 10 else (1 if width <= 18 else 2)


def lut_per_multiplier(width: int) -> int:
    return width * width if width < 10 else 0


def bram36_for(depth: int, width: int) -> float:
    """Block RAM for a memory ``depth`` words of ``width`` bits, in BRAM36 (halves count:
    an 18 Kb half is one BRAM18); 0 for a shallow memory (LUTs)."""
    if depth < SHALLOW_WORDS or width <= 0:
        return 0.0
    halves = min(math.ceil(depth / d) * math.ceil(width / w) for d, w in BRAM18_SHAPES)
    return halves / 2


def valid_reuse_factors(n_in: int, n_out: int) -> list[int]:
    """The reuse factors hls4ml 1.3 accepts for an n_in x n_out multiplication (its
    ``FPGABackend._validate_reuse_factor``): divisors of n_in * n_out that split the
    multipliers evenly over the outputs below n_in, multiples of n_in above."""
    total = n_in * n_out
    divisors = set()
    for d in range(1, math.isqrt(total) + 1):
        if total % d == 0:
            divisors.update((d, total // d))
    out = []
    for rf in sorted(divisors):
        limit = math.ceil(total / min(n_in, rf))
        if (limit % n_out == 0 or rf >= n_in) and (rf % n_in == 0 or rf < n_in):
            out.append(rf)
    return out


def closest_reuse(valid: list[int], chosen: int) -> int:
    """hls4ml's ``get_closest_reuse_factor``: the nearest valid one, the smaller on a tie."""
    best = min(valid, key=lambda r: (abs(r - chosen), r))
    return best


def estimate(graph: PieceGraph, fabric: Fabric, width: int,
             reuse: dict[str, int] | None = None) -> Estimate:
    """Resources and latency of ``graph`` on ``fabric`` at ``width``-bit fixed point, with
    ``reuse`` factors by layer name (default 1). See the module docstring for the model."""
    reuse = reuse or {}
    per_mult = dsp_per_multiplier(width)
    rows, mults, bram = [], 0, 0.0
    consumers = graph.consumers()
    wide = graph.tail
    timing: dict[str, tuple[float, float]] = {}  # layer -> (first output, last output) cycle
    for layer in graph.layers:
        r = reuse.get(layer.name, 1) if layer.op in COMPUTE else 1
        m = math.ceil(layer.products / r) if layer.op in COMPUTE else 0
        weights = 0.0
        if layer.op in COMPUTE and r > 1:  # Resource strategy: r words of m weights each
            weights = bram36_for(r, m * width)
        fifo = 0.0
        if graph.streaming:
            words = math.prod(layer.out[:-1]) if len(layer.out) == 3 else 1
            lanes = layer.out[-1]
            fifos = 1 + (consumers[layer.name] if consumers[layer.name] > 1 else 0)
            bits = width + OUTPUT_EXTRA_BITS if layer.name in wide else width
            fifo = fifos * bram36_for(words, lanes * bits)
        cycles, fill, tail = _cycles(layer, r, graph.streaming)
        start = max((timing[i][0] for i in layer.inputs), default=0.0)
        end_in = max((timing[i][1] for i in layer.inputs), default=0.0)
        if graph.streaming:
            end = max(start + cycles, end_in + tail)
            first = start + fill
        else:  # io_parallel: one layer after the other
            end = end_in + cycles
            first = end
        timing[layer.name] = (first, end)
        bram += weights + fifo
        mults += m
        rows.append({"name": layer.name, "op": layer.op, "shape": list(layer.out),
                     "reuse": r, "multipliers": m, "dsp": m * per_mult,
                     "bram36": math.ceil(weights + fifo), "cycles": int(cycles)})
    last = graph.layers[-1]
    total = timing[last.name][1]
    interval = max(row["cycles"] for row in rows)
    if graph.streaming:
        total += graph.output.size  # the output stream, a value a cycle
        interval = max(interval, graph.input.size, graph.output.size)
        latency = total / (fabric.clock_mhz * 1e6) + fabric.call_overhead_s
    else:
        dma = (graph.input.size + graph.output.size) * 4 / fabric.dma_bytes_per_second
        latency = total / (fabric.clock_mhz * 1e6) + dma + fabric.call_overhead_s
    return Estimate(rows, mults, mults * per_mult, math.ceil(bram), int(total), int(interval),
                    latency, fabric.dsp, fabric.bram36, graph.io_type,
                    mults * lut_per_multiplier(width), fabric.lut)


def _cycles(layer: Layer, r: int, streaming: bool) -> tuple[float, float, float]:
    """(cycles to read everything, cycles to its first output, cycles after its last input)."""
    if layer.op == "input":
        return (layer.items, 1, 1) if streaming else (0, 0, 0)
    if layer.op == "dense":
        own = r + math.ceil(math.log2(max(2, layer.weight_shape[0]))) + 4
        return own, own, own
    if not streaming:  # io_parallel: activations and reshapes sit in the dense pipelines
        return 0, 0, 0
    if layer.op in ("conv2d", "depthwise2d", "max_pool2d", "avg_pool2d"):
        kh, kw = layer.attrs["kernel" if "pool" not in layer.op else "pool"]
        pt, pb, pl, pr = layer.attrs.get("pad", (0, 0, 0, 0))
        width = layer.in_shape[1] + pl + pr
        ii = r if layer.op in ("conv2d", "depthwise2d") else 1
        return layer.items * ii, ((kh - 1) * width + kw) * ii, ii
    if layer.op in ("global_avg_pool", "flatten"):
        return layer.items, layer.items, 1
    if layer.op == "zero_pad":  # writes every padded pixel, one a cycle
        return math.prod(layer.out[:-1]), 1, 1
    return layer.items, 1, 1  # act, add: one pixel a cycle


def choose_reuse(graph: PieceGraph, fabric: Fabric, width: int,
                 reuse: int | None = None) -> tuple[dict[str, int], Estimate]:
    """Reuse factors per compute layer and the estimate they give.

    ``reuse`` given: that factor for every layer, moved to the nearest one hls4ml accepts for
    each. Else the smallest streaming interval that fits: for each candidate interval T,
    each layer takes the largest valid factor whose pixels x factor stays within T (the fewest
    multipliers that keep up); the first T whose estimate fits the DSP slices and block RAM
    wins. When none fits, the largest factors are returned (and their estimate does not fit)."""
    layers = graph.compute
    valid = {layer.name: valid_reuse_factors(*layer.mult_size) for layer in layers}
    if reuse:
        chosen = {n: (closest_reuse(v, reuse) if reuse > 1 else 1) for n, v in valid.items()}
        return chosen, estimate(graph, fabric, width, chosen)
    intervals = sorted({layer.items * r for layer in layers for r in valid[layer.name]})
    if not intervals:  # nothing multiplies: no factor to choose
        return {}, estimate(graph, fabric, width, {})

    def at(t: int) -> dict[str, int]:
        out = {}
        for layer in layers:
            fitting = [r for r in valid[layer.name] if layer.items * r <= t]
            out[layer.name] = fitting[-1] if fitting else 1
        return out

    # the DSP slices (and LUT multipliers) needed only fall as T grows: bisect to the first T
    # they fit, then walk on until the block RAM fits too (larger factors move weights into
    # BRAM, so that need not fall)
    lo, hi = 0, len(intervals) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        e = estimate(graph, fabric, width, at(intervals[mid]))
        if e.dsp <= fabric.dsp and e.lut <= fabric.lut:
            hi = mid
        else:
            lo = mid + 1
    for t in intervals[lo:]:
        chosen = at(t)
        est = estimate(graph, fabric, width, chosen)
        if est.fits:
            return chosen, est
    return chosen, est
