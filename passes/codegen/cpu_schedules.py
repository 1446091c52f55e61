"""Default CPU schedules: fast code for the FLOP-heavy ops without a tuning run.

TVM 0.27 lowers convolutions and matmuls to plain loops unless MetaSchedule has tuned them.
These rules, in the style of ``tvm.s_tir.dlight``, give every such loop nest a fixed schedule
that is good on any CPU with fp32 SIMD (AVX2, NEON): register tiles whose innermost loop fills
the target's vector lanes, reductions ordered so the accumulators stay in registers, the fused
element-wise tail computed on each tile while it is hot, and the outer loops in parallel.

- :class:`PackedConv2d`: ``NCHW[x]c`` convolutions (regular and depthwise, see
  :mod:`splitc.passes.codegen.pack_layout`), with their fused epilogue.
- :class:`WinogradConv2d`: :mod:`splitc.passes.codegen.winograd`'s 3x3 convolutions (transforms and
  the ``(m+2)^2`` matmuls, in :class:`Matmul`'s register tiles).
- :class:`Matmul`: dense / matmul, vectorised over the output columns (one-row ones as GEMV).
- :class:`PackedPool`: max pooling on ``NCHW[x]c`` tensors.
- :class:`Elementwise`: functions without a reduction, vectorised over the innermost loop.
- :class:`RowReduction`: softmax, layer norm and other per-row reductions, rows in parallel
  (:class:`RowSoftmax` first rewrites a last-axis softmax to reduce in whole vectors).

Each rule returns ``None`` when the function is not its pattern, or when a schedule step
does not apply: the function then keeps its plain lowering, which is slow but correct.
:func:`legalize_conv2d` lowers packed convolutions to TE (the stock legalizer leaves them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d
from tvm.s_tir import dlight
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

#: Names this generation of default schedules: speed profiles and schedule selections made
#: with another are stale (bump it when a rule or a candidate changes).
CODEGEN = "default-schedules-8"

log = logging.getLogger(__name__)
_PACKED = re.compile(r"^NCHW(\d+)c$")
CONV_BLOCKS = ("conv2d_NCHWc", "depthwise_conv2d_NCHWc")
#: Accumulator vector registers a tile may use on a target with 16 (AVX2, NEON-armv7), and the
#: most output columns of a conv tile there: up to 6 columns x 2 channel blocks, so that 12 FMAs
#: load 2 weight vectors and 6 inputs (a 12 x 1 tile loads 1 and 12). On an AVX2-only Zen 3,
#: 12 x 1 was 1.2-1.9x slower than such tiles on ResNeXt-50's 1x1 convolutions.
ACCUMULATORS = 12
COLUMNS = 6
#: ... and on one with 32 (AVX-512, aarch64): 16 accumulators leave room for the weights the
#: tile loads and the broadcast input (a 7x2 or 8x2 tile measured 13 % faster on ResNet-50 than
#: 12x1 on AVX-512; 28 accumulators spilled).
WIDE_ACCUMULATORS = 16
WIDE_COLUMNS = 8


def _is_arm(target: Target) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm"))


_FEATURES: dict[str, frozenset[str]] = {}


def _cpu_features(target: Target) -> frozenset[str]:
    key = str(target)
    if key not in _FEATURES:
        _FEATURES[key] = frozenset(map(str, tvm.target.codegen.llvm_get_cpu_features(target)))
    return _FEATURES[key]


def _has_avx512(target: Target) -> bool:
    """Whether LLVM's own feature list for the target's CPU (``mcpu``, with ``mattr`` applied)
    has AVX-512F: a list of CPU names missed the ones it did not name (an AVX-512 Rocket Lake
    got the AVX2 schedules, ResNet-50 1.6x slower)."""
    return "avx512f" in _cpu_features(target)


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the target's SIMD registers: 16 (AVX-512), 8 (AVX/AVX2), 4 otherwise."""
    if _is_arm(target):
        return 4
    return 16 if _has_avx512(target) else 8


def vector_registers(target: Target) -> int:
    """SIMD registers the target has: 32 on AVX-512 and aarch64, 16 on AVX2 and armv7."""
    if _is_arm(target):
        return 32 if str(target.attrs.get("mtriple", "")).startswith("aarch64") else 16
    return 32 if _has_avx512(target) else 16


def reassociating(target: Target) -> Target:
    """``target`` with LLVM allowed to reassociate float arithmetic and to ignore the sign of
    zero, which it needs to vectorise a sum along a row (layer norm ran 7x faster, softmax
    1.5x, on 197-token rows). NaNs and infinities still propagate. The schedules and tuning
    records are keyed by ``target`` itself: this only changes the code generator's freedom."""
    attrs = dict(target.export())
    for key in ("tag", "keys"):
        attrs.pop(key, None)
    attrs.update({"fast-math-reassoc": True, "fast-math-nsz": True})
    return Target(attrs)


def conv_tile(width: int, chunks: int, registers: int, knobs: Knobs | None = None
              ) -> tuple[int, int]:
    """A convolution's register tile: (output columns, output channel blocks).

    Each input value loaded is broadcast into ``columns x blocks`` accumulators, and each
    weight vector loaded feeds ``columns`` of them. Up to :data:`COLUMNS` (8 with 32
    registers) columns, +2 where that takes the whole row, times as many blocks as the
    accumulator budget (12 of 16 registers, 16 of 32) allows. ``knobs`` (a
    :func:`candidate_knobs` entry) change the column limit and the budget.
    """
    knobs = knobs or Knobs()
    wide = registers >= 32
    budget = knobs.accumulators or (WIDE_ACCUMULATORS if wide else ACCUMULATORS)
    limit = knobs.columns or (WIDE_COLUMNS if wide else COLUMNS)
    columns = register_tile(width, min(budget, limit), slack=2)
    return columns, _largest_divisor(chunks, max(1, budget // columns))


@dataclass(frozen=True)
class Knobs:
    """The choices a default schedule makes that depend on the CPU more than on the kernel:
    one candidate of :func:`candidate_knobs`. ``None`` keeps the rule's own choice.

    The defaults were measured on one core (an AVX-512 Zen 5); a CPU with a smaller L2 or
    another FMA/load balance can want other tiles. :mod:`splitc.backend.tuning` measures
    every distinct candidate of each kernel on the device and keeps the fastest."""

    accumulators: int | None = None  # register-tile budget (conv, matmul, Winograd GEMM)
    columns: int | None = None       # conv: most output columns in one tile
    vectors: int | None = None       # matmul: most vectors across one tile row
    rows_outer: bool = False         # conv: output rows outside the channel chunks
    ic_chunk: int | None = None      # conv: input channels summed per sweep of the output

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in (("acc", self.accumulators), ("cols", self.columns),
                                          ("vec", self.vectors), ("chunk", self.ic_chunk))
                 if v is not None]
        return ",".join(parts + (["rows-outer"] if self.rows_outer else [])) or "default"


def candidate_knobs(registers: int) -> list[Knobs]:
    """The candidates the selection measures, the default first: narrower and wider conv
    tiles (more channel blocks per broadcast, or more columns per weight load), a larger
    accumulator budget, the rows-outer loop order (the weights swept per output row rather
    than the input per channel chunk: better when weights fit in L2 and activations do not),
    the input channels summed in chunks of 128 (a tile's slice of the weights then stays in
    L1 across the whole output; see :class:`PackedConv2d`), and matmul tiles of 1, 2 or 4
    vectors. A handful, not a search: seconds per kernel."""
    if registers >= 32:
        return [Knobs(), Knobs(columns=4, accumulators=16, vectors=2),
                Knobs(columns=14, accumulators=14, vectors=1),
                Knobs(columns=6, accumulators=24, vectors=3),
                Knobs(rows_outer=True, vectors=4), Knobs(ic_chunk=128),
                Knobs(columns=6, accumulators=24, ic_chunk=128)]
    return [Knobs(), Knobs(columns=4, accumulators=12, vectors=2),
            Knobs(columns=8, accumulators=8, vectors=1), Knobs(columns=12, accumulators=12),
            Knobs(columns=3, accumulators=15), Knobs(rows_outer=True),
            Knobs(columns=4, accumulators=12, rows_outer=True), Knobs(ic_chunk=128),
            Knobs(columns=4, accumulators=12, ic_chunk=128)]


# -- legalization --------------------------------------------------------------------------------
def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Lower ``R.nn.conv2d`` in ``NCHW[x]c`` to TE; anything else goes to TVM's legalizer."""
    a = call.attrs
    din, dout = _PACKED.match(a.data_layout), _PACKED.match(a.out_layout)
    if not (din and dout):
        return _nn_conv2d(bb, call)
    data, kernel = call.args
    k = [int(d) for d in kernel.ty.shape]
    if int(a.groups) > 1 and k[1] * k[4] == 1:  # one input channel per group: depthwise
        return bb.call_te(_depthwise_nchwc, data, kernel, list(a.strides), list(a.padding),
                          list(a.dilation), primfunc_name_hint="depthwise_conv2d_NCHWc")
    if int(a.groups) > 1:
        return bb.call_te(_grouped_nchwc, data, kernel, int(a.groups), list(a.strides),
                          list(a.padding), list(a.dilation), primfunc_name_hint="conv2d_NCHWc")
    return bb.call_te(topi.nn.conv2d_NCHWc, data, kernel, list(a.strides), list(a.padding),
                      list(a.dilation), a.data_layout, a.out_layout, "float32",
                      primfunc_name_hint="conv2d_NCHWc")


def row_softmax(x: te.Tensor, lanes: int) -> te.Tensor:
    """Softmax over the last axis with each row padded to whole vectors of ``lanes``: the
    maximum and the sum are taken per lane first (``row_max_part``, ``row_sum_part``: plain
    vector max and add, no NaN or reassociation licence needed), then across the lanes. The
    padding holds the lowest float, whose exponential is below 1e-38 and adds nothing.
    Stock softmax reduces the row as one scalar chain: without a no-NaN licence LLVM does not
    vectorise a maximum (about 1.7x slower on ViT-tiny's 4 x 197 rows of 197, measured on an
    x86 core)."""
    *lead, length = (int(d) for d in x.shape)
    chunks = -(-length // lanes)
    lowest = tirx.min_value(x.dtype)
    pad = te.compute((*lead, chunks * lanes),
                     lambda *i: te.if_then_else(i[-1] < length, x[i], lowest), name="row_pad")
    row_max = _by_lanes(pad, te.max, lanes, "row_max")
    delta = te.compute(pad.shape, lambda *i: pad[i] - row_max[i[:-1]], name="row_delta")
    exp = topi.fast_exp(delta)
    row_sum = _by_lanes(exp, te.sum, lanes, "row_sum")
    return te.compute(x.shape, lambda *i: exp[i] / row_sum[i[:-1]], name="T_softmax_norm")


def _by_lanes(data: te.Tensor, combine, lanes: int, name: str) -> te.Tensor:
    """``combine`` (``te.max``, ``te.sum``) over the last axis of ``data``, whole vectors of
    ``lanes``: per lane first (stage ``<name>_part``), then across the lanes (``<name>``)."""
    *lead, width = (int(d) for d in data.shape)
    ko = te.reduce_axis((0, width // lanes), "ko")
    part = te.compute((*lead, lanes),
                      lambda *i: combine(data[(*i[:-1], ko * lanes + i[-1])], axis=ko),
                      name=f"{name}_part")
    lane = te.reduce_axis((0, lanes), "lane")
    return te.compute(tuple(lead), lambda *i: combine(part[(*i, lane)], axis=lane), name=name)


@tvm.transform.module_pass(opt_level=0, name="RowSoftmax")
class RowSoftmax:
    """Softmax over the last axis of a static shape becomes :func:`row_softmax`, in
    vectors of ``lanes`` (the rest is left to ``FastMathTransform`` and the legalizer)."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lanes = self.lanes

        @relax.expr_functor.mutator
        class _Rewrite(relax.PyExprMutator):
            def visit_call_(self, call):
                call = self.visit_expr_post_order(call)
                if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.softmax"):
                    return call
                ty = call.args[0].ty
                if not (isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr)
                        and all(isinstance(d, tirx.IntImm) for d in ty.shape.values)
                        and int(call.attrs.axis) in (-1, ty.ndim - 1)
                        and ty.dtype == "float32"):
                    return call
                return self.builder_.call_te(row_softmax, call.args[0], lanes,
                                             primfunc_name_hint="row_softmax")

        rewrite = _Rewrite(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewrite.builder_.update_func(gv, rewrite.visit_expr(func))
        return rewrite.builder_.get()


def _depthwise_nchwc(data, kernel, strides, padding, dilation):
    n, chunks, _, _, block = data.shape
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    (sh, sw), (dh, dw) = strides, dilation
    padded, out_h, out_w = _padded(data, kh, kw, strides, padding, dilation)
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, chunks, out_h, out_w, block),
        lambda b, c, y, x, k: te.sum(
            padded[b, c, y * sh + rh * dh, x * sw + rw * dw, k] * kernel[c, 0, rh, rw, 0, k],
            axis=[rh, rw]),
        name="depthwise_conv2d_NCHWc")


def _padded(data, kh: int, kw: int, strides, padding, dilation):
    """The ``NCHW[x]c`` input zero-padded (stage ``data_pad``) and the output's height and
    width for a ``kh x kw`` window."""
    _, _, height, width, _ = data.shape
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    padded = topi.nn.pad(data, (0, 0, top, left, 0), (0, 0, bottom, right, 0), name="data_pad")
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    return padded, out_h, out_w


def _grouped_nchwc(data, kernel, groups, strides, padding, dilation):
    """A grouped convolution on ``NCHW[b]c`` whose blocks lie in one group each: the loops
    and names of ``topi.nn.conv2d_NCHWc`` (so :class:`PackedConv2d` schedules it), with the
    input channels of the output block's group."""
    n, _, _, _, block = data.shape
    chunks_out, ic_chunks, kh, kw = (int(d) for d in kernel.shape[:4])
    per_group_in = ic_chunks * block                      # input channels per group
    per_group_out = chunks_out * block // groups          # output channels per group
    (sh, sw), (dh, dw) = strides, dilation
    padded, out_h, out_w = _padded(data, kh, kw, strides, padding, dilation)
    ic = te.reduce_axis((0, per_group_in), "ic")
    rh, rw = te.reduce_axis((0, kh), "kh"), te.reduce_axis((0, kw), "kw")

    def conv(b, oc, y, x, k):
        first = oc * block // per_group_out * ic_chunks     # the group's first input chunk
        return te.sum(padded[b, first + ic // block, y * sh + rh * dh, x * sw + rw * dw,
                             ic % block] * kernel[oc, ic // block, rh, rw, ic % block, k],
                      axis=[ic, rh, rw])

    return te.compute((n, chunks_out, out_h, out_w, block), conv, name="conv2d_NCHWc")


# -- shared steps ----------------------------------------------------------------------------------
def _find_block(sch: s_tir.Schedule, names) -> s_tir.schedule.SBlockRV | None:
    for name in names:
        try:
            return sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - get_sblock raises when the name is absent
            continue
    return None


def _extent(sch: s_tir.Schedule, loop) -> int:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else -1


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def register_tile(extent: int, limit: int, slack: int = 0) -> int:
    """How many outputs along one axis a tile keeps in registers (at most ``limit``, or the
    whole axis when it is at most ``limit + slack``). A divisor of ``extent`` when a large one
    exists; else the size that wastes least on the last, partial tile (prime widths such as
    13 or 55 would otherwise get tiles of 1)."""
    if extent <= limit + slack:
        return extent
    best = _largest_divisor(extent, limit)
    half = -(-limit // 2)
    if best >= half:
        return best
    return min(range(half, limit + 1),
               key=lambda r: (-(-extent // r) * r - extent, -r))


def _epilogue(sch: s_tir.Schedule, block, at_loop) -> list:
    """Inline the element-wise chain after ``block`` into its last op and compute that per tile.

    Returns the loops of the tile's write-back (the last op, or a cache of ``block``'s output
    when nothing follows it), innermost last.
    """
    last = _inline_chain(sch, block)
    if last is None:
        last = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(last, at_loop)
    return sch.get_loops(last)


def _inline_chain(sch: s_tir.Schedule, block):
    """Inline the element-wise chain after ``block`` into its last op; returns that op (None
    when nothing follows ``block``)."""
    chain, cur = [], block
    while True:
        consumers = sch.get_consumers(cur)
        if len(consumers) != 1:
            break
        chain.append(consumers[0])
        cur = consumers[0]
    for blk in chain[:-1]:
        sch.compute_inline(blk)
    return chain[-1] if chain else None


def _vector_init(sch: s_tir.Schedule, block, loop) -> None:
    """Split ``block``'s zero-initialisation out above ``loop`` and vectorise it."""
    init = sch.decompose_reduction(block, loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _vector_tail(sch: s_tir.Schedule, block, at_loop, width: int) -> None:
    """:func:`_epilogue` at ``at_loop``, its innermost loop in vectors of ``width`` where
    they divide it."""
    tail = _epilogue(sch, block, at_loop)
    if _extent(sch, tail[-1]) % width == 0:
        sch.vectorize(sch.split(tail[-1], [None, width])[-1])


def _parallel_pad(sch: s_tir.Schedule, name: str = "data_pad") -> None:
    pad = _find_block(sch, [name])
    if pad is None:
        return
    loops = sch.get_loops(pad)
    sch.vectorize(loops[-1])
    sch.parallel(sch.fuse(*loops[:3]))


def _finish(func: tirx.PrimFunc, build) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    try:
        build(sch)
    except Exception as err:  # noqa: BLE001 - any failure leaves the plain (correct) loops
        log.debug("default schedule not applied: %s", str(err).splitlines()[-1:])
        return None
    return sch


class Guarded(ScheduleRule):
    """Another rule (dlight's) whose failure on an odd function leaves its plain loops, as
    splitc's own rules do, instead of failing the build.

    A schedule that runs some block more often than the block has iterations is refused too:
    dlight's CPU reduction rule puts a batch-1 softmax's whole max/sum reductions inside a
    parallel loop over its 1,000 outputs (1000x the work: hundreds of times slower than plain
    loops).
    """

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        try:
            sch = self.rule.apply(func, target, tunable)
        except Exception as err:  # noqa: BLE001
            log.debug("%s not applied: %s", type(self.rule).__name__,
                      str(err).splitlines()[-1:])
            return None
        if isinstance(sch, s_tir.Schedule) and recomputes(sch):
            log.debug("%s not applied: it recomputes blocks", type(self.rule).__name__)
            return None
        return sch


def recomputes(sch: s_tir.Schedule, slack: float = 2.0) -> bool:
    """Whether some reduction block runs more than ``slack`` times its iteration count (loops
    split with a partial last tile run a little more; a reduction nested in an unrelated loop
    runs that loop's extent times more). Element-wise blocks computed per tile (a padded
    input's halo) may legitimately repeat a little and are not counted."""
    for block in top_blocks(sch):
        if not reduces(sch, block):
            continue
        domain = 1
        for iv in sch.get(block).iter_vars:
            ext = iv.dom.extent
            domain *= int(ext) if isinstance(ext, tirx.IntImm) else 1
        runs = 1
        for loop in sch.get_loops(block):
            runs *= max(1, _extent(sch, loop))
        if runs > slack * max(1, domain):
            return True
    return False


def top_blocks(sch: s_tir.Schedule) -> list:
    """The blocks under the function's root block (none for a function without one)."""
    root = _find_block(sch, ["root"])
    return [] if root is None else list(sch.get_child_blocks(root))


def reduces(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block`` has a reduction axis."""
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


# -- rules -----------------------------------------------------------------------------------------
class PackedConv2d(ScheduleRule):
    """``conv2d_NCHWc`` / ``depthwise_conv2d_NCHWc`` with its fused epilogue.

    Loop order per tile (n, oc_chunk_outer, oh, ow_outer parallel/serial):
    ``ic_outer, kh, kw, ic_inner`` (reduction), ``ow_inner`` and ``oc_chunk_inner`` (unrolled,
    one accumulator register each, see :func:`conv_tile`), ``oc_block`` (vector lanes). The
    padded input is a separate parallel stage. ``knobs`` change the tile and, with
    ``rows_outer``, run the output rows outside the channel chunks.

    With ``ic_chunk`` (a 1x1 convolution summing more input channels than that), the sum runs
    in chunks of them, each chunk over the whole output of the channel-block group before the
    next (``n, oc_chunk_outer`` parallel, ``ic_chunk_outer, oh, ow_outer, ...``): the tile's
    slice of the weights (``blocks x ic_chunk`` vectors, 32 KiB at 2 x 128) stays in L1 across
    every row instead of streaming all input channels' weights from L2 once per row, at the
    cost of adding each chunk into the output; the epilogue runs once per group after the last
    chunk. Measured on an AVX-512 Xeon, ResNet-50's 1x1 convolutions of 512-2048 input
    channels ran 5-15 % faster; 256 -> 64 at 56x56 ran 12 % slower, its output slab added into
    once per chunk (hence a candidate, not the default).
    """

    def __init__(self, knobs: Knobs | None = None):
        self.knobs = knobs or Knobs()

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        knobs = self.knobs
        probe = s_tir.Schedule(func)
        conv = _find_block(probe, CONV_BLOCKS)
        if conv is None:
            return None
        depthwise = probe.get(conv).name_hint.startswith("depthwise")

        def build(sch: s_tir.Schedule):
            conv = _find_block(sch, CONV_BLOCKS)
            loops = sch.get_loops(conv)
            n, occ, oh, ow, ocb = loops[:5]
            reduce = loops[5:]
            if depthwise:  # each channel has its own input: a wider tile shares nothing
                reg = register_tile(_extent(sch, ow), knobs.columns or ACCUMULATORS, slack=2)
                blocks = 1
            else:
                reg, blocks = conv_tile(_extent(sch, ow), _extent(sch, occ),
                                        vector_registers(target), knobs)
            owo, owi = sch.split(ow, [None, reg])
            occo, occi = sch.split(occ, [None, blocks])
            chunks = None
            if depthwise:
                order = list(reduce)
            else:
                ic, kh, kw = reduce
                ic_block = _ic_block(sch, conv)
                blocks_in = _extent(sch, ic) // ic_block
                if (knobs.ic_chunk and _extent(sch, kh) * _extent(sch, kw) == 1
                        and _extent(sch, ic) > knobs.ic_chunk):
                    # whole blocks that divide the channels: no partial chunk to predicate
                    per = _largest_divisor(blocks_in, max(1, knobs.ic_chunk // ic_block))
                    chunks, ico, ici = sch.split(ic, [None, per, ic_block])
                else:
                    ico, ici = sch.split(ic, [None, ic_block])
                order = [ico, kh, kw, ici]
            if chunks is not None:
                _chunked_sum(sch, conv, (n, occo), chunks, (oh, owo), order, (owi, occi, ocb))
                return
            outer = (n, oh, occo) if knobs.rows_outer else (n, occo, oh)
            sch.reorder(*outer, owo, *order, owi, occi, ocb)
            tail = _epilogue(sch, conv, owo)
            sch.vectorize(tail[-1])
            sch.unroll(owi)
            sch.unroll(occi)
            sch.vectorize(ocb)
            sch.parallel(sch.fuse(*outer))
            _vector_init(sch, conv, order[0])
            _parallel_pad(sch)

        return _finish(func, build)


def _chunked_sum(sch: s_tir.Schedule, conv, outer, chunks, rows, order, tile) -> None:
    """:class:`PackedConv2d`'s loops with the input channels summed chunk by chunk, each
    chunk over all ``rows`` (output rows and column tiles) of the ``outer`` channel group;
    the epilogue per group after the last chunk."""
    owi, occi, ocb = tile
    sch.reorder(*outer, chunks, *rows, *order, *tile)
    last = _inline_chain(sch, conv)
    if last is not None:
        sch.reverse_compute_at(last, outer[-1])
        tail = sch.get_loops(last)
        sch.vectorize(tail[-1])
    sch.unroll(owi)
    sch.unroll(occi)
    sch.vectorize(ocb)
    sch.parallel(sch.fuse(*outer))
    _vector_init(sch, conv, chunks)
    _parallel_pad(sch)


def _ic_block(sch: s_tir.Schedule, conv) -> int:
    """The input's channel block: the last dimension of the conv's first read buffer."""
    data = sch.get(conv).reads[0].source
    return int(data.shape[-1])


class Matmul(ScheduleRule):
    """A matmul/dense block ``C[..., i, j] += A[..., i, k] * B[..., k, j]`` (B may be ``[j, k]``).

    Tiles ``i`` by rows and ``j`` by up to 3 vectors, reduction outside the tile: as many
    accumulators as :func:`matmul_tile` allows, rows and odd widths padded so that no tile is
    partial. Each vector is its own (unrolled) loop of the target's lanes: LLVM splits a
    48-wide vector badly (9 GFLOP/s where 3 x 16 runs at 180). ``knobs`` change the tile.
    """

    def __init__(self, knobs: Knobs | None = None):
        self.knobs = knobs or Knobs()

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        probe = s_tir.Schedule(func)
        block = _matmul_block(probe)
        if block is None:
            return None
        lanes = vector_lanes(target)
        registers = vector_registers(target)
        name = probe.get(block).name_hint

        def build(sch: s_tir.Schedule):
            blk = sch.get_sblock(name)
            *outer, i, j, k = sch.get_loops(blk)
            if all(_extent(sch, loop) == 1 for loop in (*outer, i)):
                _gemv(sch, blk, lanes)
                return
            height, cols = _extent(sch, i), _extent(sch, j)
            # odd widths (197 tokens): compute on whole vectors, padded copies around
            col_pad = lanes if cols % lanes and cols > 4 * lanes else 1
            cols = -(-cols // col_pad) * col_pad
            rows, vectors, width = matmul_tile(height, cols, lanes, registers, self.knobs)
            # a partial last row tile predicates every FMA: 108 GFLOP/s where padded rows run
            # at 240 (197 x 192 x 768)
            row_pad = rows if height % rows else 1
            if col_pad > 1 or row_pad > 1:
                sch.pad_einsum(blk, [1] * len(outer) + [row_pad, col_pad, 1])
                *outer, i, j, k = sch.get_loops(blk)
            outer, first, second, k = _register_tiles(sch, blk, rows, vectors, width)
            if col_pad > 1:
                # cropping the padded columns predicates every lane of the tile's last vector,
                # and TVM then writes the whole tile scalar (QK^T of a ViT: 120 GFLOP/s): the
                # crop and the fused tail run after the matmul, a loop LLVM vectorises
                tail = sch.get_loops(_inline_chain(sch, blk))
                if len(tail) > 1:
                    sch.parallel(sch.fuse(*tail[:-1]))
            else:
                _vector_tail(sch, blk, second, width)
            sch.parallel(sch.fuse(*outer, first, second))
            _vector_init(sch, blk, k)

        return _finish(func, build)


def _register_tiles(sch: s_tir.Schedule, blk, rows: int, vectors: int, width: int):
    """Split a matmul block's ``..., i, j, k`` loops into register tiles of ``rows x vectors
    x width`` outputs (rows and vectors unrolled, the width one vector), the reduction outside
    the tile. Returns the outer loops, the two tile loops (outermost first) and ``k``."""
    *outer, i, j, k = sch.get_loops(blk)
    height, cols = _extent(sch, i), _extent(sch, j)
    io, ii = sch.split(i, [None, rows])
    jo, jv, jl = sch.split(j, [None, vectors, width])
    # the larger operand's tiles change least often: a weight wider than the activation is
    # tall (batch-1 layers) stays in cache across the row tiles
    first, second = (jo, io) if cols > height else (io, jo)
    sch.reorder(*outer, first, second, k, ii, jv, jl)
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    return outer, first, second, k


def _gemv(sch: s_tir.Schedule, blk, lanes: int) -> None:
    """One row times a ``[k, j]`` matrix: memory-bound, so the matrix is read once, in
    order. Columns in parallel strips of up to 32 vectors; in each, 4 rows of the matrix at a
    time are multiplied into the strip's partial sums."""
    *outer, i, j, k = sch.get_loops(blk)
    cols, depth = _extent(sch, j), _extent(sch, k)
    width = lanes
    while cols % width:  # a power of two: 4096 x 1000 in vectors of 10 ran 35 % slower than in 8s
        width //= 2
    if width < 4:
        width = _largest_divisor(cols, lanes)
    jp, jo, jl = sch.split(j, [None, _largest_divisor(cols // width, 32), width])
    ko, ki = sch.split(k, [None, _largest_divisor(depth, 4)])
    sch.reorder(*outer, i, jp, ko, jo, ki, jl)
    _vector_tail(sch, blk, jp, width)
    sch.unroll(ki)
    sch.vectorize(jl)
    sch.parallel(jp)
    _vector_init(sch, blk, ko)


def matmul_tile(rows: int, cols: int, lanes: int, registers: int, knobs: Knobs | None = None
                ) -> tuple[int, int, int]:
    """A matmul's register tile: (rows, vectors, vector width) of output.

    Columns in whole vectors of ``lanes`` where they divide (up to 3 vectors: 6-8 rows of 2-3
    vectors ran at 240 GFLOP/s where 4 x 4 ran at 220), else the largest divisor up to 4
    vectors' worth as one vector; then as many rows as the accumulator budget leaves (12
    registers of 16, 16 of 32). Rows that no good tile divides get the full tile, the caller
    padding them (a partial tile is padded anyway), where that wastes at most 1/16 of them.
    ``knobs`` change the most vectors and the accumulator budget.
    """
    knobs = knobs or Knobs()
    if cols % lanes == 0:
        vectors, width = _largest_divisor(cols // lanes, knobs.vectors or 3), lanes
    else:
        vectors, width = 1, _largest_divisor(cols, 4 * lanes)
    budget = knobs.accumulators or (WIDE_ACCUMULATORS if registers >= 32 else ACCUMULATORS)
    limit = max(1, budget // (vectors * max(1, -(-width // lanes))))
    tile = register_tile(rows, limit)
    if rows % tile and -(-rows // limit) * limit - rows <= rows // 16:
        tile = limit
    return tile, vectors, width


def _matmul_block(sch: s_tir.Schedule):
    """The one reduction block with spatial iters ``..., i, j`` and one reduce iter ``k``."""
    found = None
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(blk)
        kinds = [iv.iter_type for iv in stmt.iter_vars]
        if not kinds or kinds[-1] != tirx.IterVar.CommReduce:
            continue
        if kinds.count(tirx.IterVar.CommReduce) != 1 or len(kinds) < 3:
            continue
        if not stmt.name_hint.startswith(("matmul", "T_matmul", "NT_matmul", "T_dense", "dense")):
            continue
        if found is not None:
            return None
        found = blk
    return found


class WinogradConv2d(ScheduleRule):
    """:func:`~.winograd.conv2d_winograd` with its fused epilogue: three parallel
    loop nests. The input transform per (tile, channel block), its ``d B`` stage computed
    there and every transform loop unrolled (the select chains fold to the nonzero terms),
    channels in vectors; the ``(m+2)^2`` matmuls in :func:`matmul_tile`'s register tiles;
    the output transform and the epilogue per ``m x m`` output tile, in vectors of the
    output channel block. ``knobs`` change the matmuls' tile."""

    def __init__(self, knobs: Knobs | None = None):
        self.knobs = knobs or Knobs()

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        if not is_winograd(func):
            return None
        lanes, registers = vector_lanes(target), vector_registers(target)

        def build(sch: s_tir.Schedule):
            v = sch.get_sblock("winograd_V")
            e, n, p, c = sch.get_loops(v)
            alpha = _extent(sch, e)
            ib = _ic_block(sch, sch.get_sblock("winograd_rows"))
            cc, k = sch.split(c, [None, ib])
            sch.reorder(p, cc, e, n, k)
            _transform_at(sch, "winograd_rows", cc)
            sch.unroll(e)
            sch.unroll(n)
            sch.vectorize(k)
            sch.parallel(sch.fuse(p, cc))
            _parallel_pad(sch)

            gemm = sch.get_sblock("winograd_M")
            *_, p, co, _ = sch.get_loops(gemm)
            tile = matmul_tile(_extent(sch, p), _extent(sch, co), lanes, registers, self.knobs)
            outer, first, second, ci = _register_tiles(sch, gemm, *tile)
            sch.parallel(sch.fuse(*outer, first, second))
            _vector_init(sch, gemm, ci)

            conv = sch.get_sblock("conv2d_winograd")
            shape = [_extent(sch, loop) for loop in sch.get_loops(conv)]
            last = _inline_chain(sch, conv)
            if last is not None and [_extent(sch, lp) for lp in sch.get_loops(last)] == shape:
                sch.compute_inline(conv)  # the epilogue computes the output transform
                out = last
            else:  # a chain of another shape (a layout change) runs after, as its own loop
                if last is not None:
                    tail = sch.get_loops(last)
                    if len(tail) > 1:
                        sch.parallel(sch.fuse(*tail[:-1]))
                out = conv
            b, oc, y, x, ob = sch.get_loops(out)
            m = alpha - 2
            ty, yi = sch.split(y, [None, m])
            tx, xi = sch.split(x, [None, m])
            sch.reorder(b, oc, ty, tx, yi, xi, ob)
            _transform_at(sch, "winograd_orow", tx)
            sch.unroll(yi)
            sch.unroll(xi)
            sch.vectorize(ob)
            sch.parallel(sch.fuse(b, oc, ty))

        return _finish(func, build)


def is_winograd(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is a :func:`~splitc.passes.codegen.winograd.conv2d_winograd` kernel."""
    probe = s_tir.Schedule(func)
    return all(_find_block(probe, [name]) is not None
               for name in ("winograd_M", "conv2d_winograd"))


def _transform_at(sch: s_tir.Schedule, name: str, loop) -> None:
    """A Winograd transform's first stage computed under ``loop``: its two transform loops
    unrolled (the select chains fold to the nonzero terms), its channel block a vector."""
    block = sch.get_sblock(name)
    sch.compute_at(block, loop)
    *_, first, second, lanes = sch.get_loops(block)
    sch.unroll(first)
    sch.unroll(second)
    sch.vectorize(lanes)


class PackedPool(ScheduleRule):
    """Max pooling on ``NCHW[x]c``: the window loops move outside the channel block, and
    the padding is read in place (a select per window row and column) rather than copied
    first: ResNet-50's 3x3 stride-2 pool on 112x112x64 ran 0.39 ms with the padded copy
    (3.3 MB written and read back), 0.15 ms without (ONNX Runtime 0.16), alone on the AVX-512
    Xeon, flushed caches."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        probe = s_tir.Schedule(func)
        pool = _find_block(probe, ["pool_max"])
        if pool is None or len(probe.get_loops(pool)) != 7:
            return None

        def build(sch: s_tir.Schedule):
            blk = sch.get_sblock("pool_max")
            n, c, h, w, cb, rh, rw = sch.get_loops(blk)
            sch.reorder(n, c, h, w, rh, rw, cb)
            tail = _epilogue(sch, blk, w)
            sch.vectorize(tail[-1])
            sch.vectorize(cb)
            sch.parallel(sch.fuse(n, c, h))
            _vector_init(sch, blk, rh)
            pad = _find_block(sch, ["pad_temp"])
            if pad is not None:
                sch.compute_inline(pad)

        return _finish(func, build)


class Elementwise(ScheduleRule):
    """A function with no reduction (an element-wise chain the conv did not absorb, such as
    DenseNet's batch norm and ReLU before each convolution, a concatenation, a layout change):
    every block inlined into the last, its innermost loop in vectors of the target's lanes
    where they divide it (a packed channel block), the outer loops parallel. The loop nest is
    kept: flattening it costs a vector division per element wherever the source index is not
    linear (a layout change or a slice ran 2-3x slower than plain loops)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        probe = s_tir.Schedule(func)
        blocks = top_blocks(probe)
        if not blocks or any(iv.iter_type != tirx.IterVar.DataPar
                             for b in blocks for iv in probe.get(b).iter_vars):
            return None
        lanes = vector_lanes(target)

        def build(sch: s_tir.Schedule):
            *producers, last = top_blocks(sch)
            for blk in producers:
                sch.compute_inline(blk)
            loops = sch.get_loops(last)
            if not loops:
                return
            inner = loops[-1]
            if _extent(sch, inner) % lanes == 0:
                inner = sch.split(inner, [None, lanes])[-1]
                sch.vectorize(inner)
            if len(loops) > 1:
                sch.parallel(sch.fuse(*loops[:-1]))

        return _finish(func, build)


class RowReduction(ScheduleRule):
    """Reductions over the last axis of each row, then element-wise work on the row (softmax,
    layer norm): rows in parallel, every block computed per row, the row's loops left whole
    for LLVM to vectorise (dlight's rule splits them by 16 and predicates the rest: a row of
    197 tokens then runs scalar)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        del tunable
        probe = s_tir.Schedule(func)
        blocks = top_blocks(probe)
        if len(blocks) < 2 or not any(reduces(probe, b) for b in blocks):
            return None
        lanes = vector_lanes(target)

        def build(sch: s_tir.Schedule):
            *producers, last = top_blocks(sch)
            loops = sch.get_loops(last)
            if len(loops) < 2:
                raise ValueError("no rows")
            row = sch.fuse(*loops[:-1])
            for blk in reversed(producers):
                sch.compute_at(blk, row)
            for blk in producers:
                _vector_lanes(sch, blk, lanes)
            sch.parallel(row)
            if recomputes(sch, slack=1.0):
                raise ValueError("a block is recomputed per row")

        return _finish(func, build)


def _vector_lanes(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Within a row: a per-lane partial reduction (:func:`row_softmax`'s ``row_*_part``) runs
    its lanes as one vector, the reduction outside; an element-wise block over whole vectors
    is split into them. Anything else is left to LLVM."""
    inner = sch.get_loops(block)[1:]
    realize = sch.get(inner[-1]).body if inner else None
    if not isinstance(realize, s_tir.SBlockRealize):
        return
    kind = {value: iv.iter_type for iv, value in zip(sch.get(block).iter_vars,
                                                     realize.iter_values, strict=True)
            if isinstance(value, tirx.Var)}
    loops = [lp for lp in inner if _extent(sch, lp) != 1]
    spatial = [lp for lp in loops if kind.get(sch.get(lp).loop_var) == tirx.IterVar.DataPar]
    if reduces(sch, block):
        if len(spatial) != 1 or _extent(sch, spatial[0]) != lanes:
            return
        reduce_loops = [lp for lp in loops if lp not in spatial]
        if reduce_loops:  # none when the row is one vector
            sch.reorder(*reduce_loops, spatial[0])
        sch.vectorize(spatial[0])
    elif len(loops) == 1 and _extent(sch, loops[0]) % lanes == 0:
        sch.vectorize(sch.split(loops[0], [None, lanes])[-1])


def default_rules(knobs: Knobs | None = None) -> list[ScheduleRule]:
    """splitc's rules first, then dlight's CPU rules (softmax, norms, reductions, GEMV);
    ``knobs`` for the rules that take them (the defaults: ``None``)."""
    return [WinogradConv2d(knobs), PackedConv2d(knobs), Matmul(knobs), PackedPool(),
            Elementwise(), RowReduction(), Guarded(dlight.cpu.Reduction()),
            Guarded(dlight.cpu.GEMV())]


def default_schedule(func: tirx.PrimFunc, target: Target, knobs: Knobs | None = None
                     ) -> s_tir.Schedule | None:
    """The first of :func:`default_rules` that schedules ``func`` (None: plain loops)."""
    for rule in default_rules(knobs):
        sch = rule.apply(func, target, False)
        if isinstance(sch, s_tir.Schedule):
            return sch
    return None


def candidates(func: tirx.PrimFunc, target: Target) -> list[tuple[Knobs, s_tir.Schedule]]:
    """Each distinct schedule of ``func`` under :func:`candidate_knobs` for ``target``, the
    default first (one entry for kernels whose rule takes no knobs, none for plain loops)."""
    out, seen = [], set()
    for knobs in candidate_knobs(vector_registers(target)):
        sch = default_schedule(func, target, knobs)
        if sch is None:
            continue
        key = tvm_ffi.structural_hash(sch.mod)
        if key not in seen:
            seen.add(key)
            out.append((knobs, sch))
    return out
