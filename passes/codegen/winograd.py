"""WinogradConv: 3x3 convolutions as Winograd ``F(m x m, 3 x 3)``, where that is faster.

A 3x3 stride-1 convolution computes each ``m x m`` output tile from an ``(m+2) x (m+2)``
input tile. Winograd's algorithm transforms both tiles and the kernel so that the convolution
becomes ``(m+2)^2`` independent matrix products, ``tiles x C_in`` by ``C_in x C_out``: 4x
fewer multiplications for ``m = 4``, 2.25x for ``m = 2``, and the products are plain GEMMs
the matmul tile runs at full speed. The kernel's transform depends only on the weights, so
:func:`splitc.backend.build.build` lifts it out and applies it once, at compile time; the artifact
stores the transformed weights (``(m+2)^2 / 9`` times the kernel's bytes).

Fewer FLOPs are not always faster: the transformed weights are bigger and are read once per
GEMM, so a layer with few tiles (ResNet's 7x7x512) stays a direct convolution.
:func:`winograd_tile` decides per layer with a three-term cost model; :func:`plan_winograd`
is the analysis, :class:`WinogradConv` the rewrite. It runs on the packed (``NCHW[x]c``)
convolutions :class:`~splitc.passes.codegen.pack_layout.PackConvLayout` leaves, and only on those
whose kernel is a weight (a constant, or a parameter after ``num_input``, rearranged).
:class:`~splitc.passes.codegen.cpu_schedules.WinogradConv2d` schedules the kernel.

The transform matrices are TVM's (``topi.nn.winograd_util``: Cook-Toom with the interpolation
points of Barabasz et al., the most accurate known in float32); coefficients that are zero
are left out of the generated sums, and the sums are written out term by term.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

from splitc.passes.ir import plain_conv2d, rewrite_bindings, static_shape

_PACKED = re.compile(r"^NCHW(\d+)c$")
_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")
#: Output tile sizes considered (m); larger tiles lose float32 accuracy and gain little.
TILES = (4, 2)
#: The cost model's rates, measured on one core of an AVX-512 machine (only their ratios
#: decide): matmul FLOPs per second, transformed-weight bytes streamed per second, and
#: transformed input/output elements per second.
FLOPS_PER_S = 240e9
WEIGHT_BYTES_PER_S = 30e9
TRANSFORM_ELEMENTS_PER_S = 10.6e9
#: Winograd is taken only when the model expects it this much faster than the direct
#: convolution (its answer differs from the direct one in the last bits).
MARGIN = 0.9


def winograd_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A`` ((m+2) x m), ``B`` ((m+2) x (m+2)) and ``G`` ((m+2) x 3) of ``F(m, 3)``, float32:
    output ``= A^T [(G g G^T) * (B^T d B)] A`` for a 3x3 kernel ``g`` and input tile ``d``."""
    a, b, g = _cook_toom_convolution(_interpolation_points(tile + 1), tile, 3)
    return a.astype("float32"), b.astype("float32"), g.astype("float32")


def winograd_seconds(tile: int, tiles: int, c_in: int, c_out: int) -> float:
    """Predicted time of ``F(tile, 3)`` over ``tiles`` output tiles: the (tile+2)^2 matmuls,
    their transformed weights read once, and the input and output transforms."""
    alpha2 = (tile + 2) ** 2
    return (2 * alpha2 * tiles * c_in * c_out / FLOPS_PER_S
            + 4 * alpha2 * c_in * c_out / WEIGHT_BYTES_PER_S
            + alpha2 * tiles * (c_in + c_out) / TRANSFORM_ELEMENTS_PER_S)


def winograd_tile(batch: int, height: int, width: int, c_in: int, c_out: int) -> int | None:
    """The output tile ``m`` for a 3x3 stride-1 convolution with this output, or None when
    the direct convolution is predicted faster. ResNet's 56x56x64 layer: ``m = 4``
    (3.4x faster, measured); VGG's 14x14x512: ``m = 2`` (1.7x); 7x7x512: direct."""
    direct = 2 * 9 * batch * height * width * c_in * c_out / FLOPS_PER_S
    best, best_s = None, MARGIN * direct
    for m in TILES:
        tiles = batch * -(-height // m) * -(-width // m)
        seconds = winograd_seconds(m, tiles, c_in, c_out)
        if seconds < best_s:
            best, best_s = m, seconds
    return best


def stored_weight_factor(call: relax.Expr) -> float:
    """How many times its kernel's bytes a plain ``NCHW`` convolution's weights take once
    built for a CPU: ``(m+2)^2 / 9`` where :func:`winograd_tile` picks ``F(m, 3)``, else 1.
    The cost model's per-device memory counts the weights as the artifact stores them."""
    conv = plain_conv2d(call)
    if conv is None:
        return 1.0
    k, out = static_shape(call.args[1]), static_shape(call)
    if not _unit_3x3(call.attrs, k):
        return 1.0
    tile = winograd_tile(out[0], out[2], out[3], k[1], k[0])
    return 1.0 if tile is None else (tile + 2) ** 2 / 9


def _unit_3x3(attrs, kernel_shape) -> bool:
    """A 3x3 kernel, stride 1, no dilation, one group: the convolutions Winograd computes."""
    return (int(attrs.groups) == 1 and tuple(kernel_shape[2:4]) == (3, 3)
            and [int(s) for s in attrs.strides] == [1, 1]
            and [int(d) for d in attrs.dilation] == [1, 1])


# -- compute ---------------------------------------------------------------------------------------
def _terms(pairs) -> tirx.PrimExpr:
    """``sum(c * e)`` over the pairs whose constant ``c`` is not zero (1 and -1 unscaled)."""
    out = None
    for c, e in pairs:
        c = float(c)
        if c == 0.0:
            continue
        term = e if c == 1.0 else -e if c == -1.0 else e * tirx.const(c, "float32")
        out = term if out is None else out + term
    return tirx.const(0.0, "float32") if out is None else out


def _pick(index, options) -> tirx.PrimExpr:
    """``options[index]``: a select chain, folded to one option once ``index`` is a constant
    (the schedule unrolls these loops)."""
    expr = options[-1]
    for j in range(len(options) - 2, -1, -1):
        expr = tirx.Select(index == j, options[j], expr)
    return expr


def winograd_weights(kernel: te.Tensor, g: te.Tensor) -> te.Tensor:
    """``U[e, n, ci, co] = (G k[co, ci] G^T)[e, n]`` from an ``OIHW[i]i[o]o`` 3x3 kernel."""
    o_chunks, i_chunks, kh, kw, ib, ob = (int(d) for d in kernel.shape)
    alpha = int(g.shape[0])
    i, j = te.reduce_axis((0, kh), "i"), te.reduce_axis((0, kw), "j")
    return te.compute(
        (alpha, alpha, i_chunks * ib, o_chunks * ob),
        lambda e, n, ci, co: te.sum(
            g[e, i] * kernel[co // ob, ci // ib, i, j, ci % ib, co % ob] * g[n, j], axis=[i, j]),
        name="winograd_weights")


def conv2d_winograd(data: te.Tensor, weights: te.Tensor, padding, out_block: int,
                    ) -> te.Tensor:
    """3x3 stride-1 convolution of ``NCHW[b]c`` data with :func:`winograd_weights`, output
    ``NCHW[out_block]c``. Stages (named for :class:`WinogradConv2d`): ``data_pad``; the
    input transform ``winograd_rows`` (``d B`` per tile row) and ``winograd_V``
    (``B^T d B``, ``[e, n, tile, c_in]``); the matmuls ``winograd_M``
    (``[e, n, tile, c_out]``); the output transform ``winograd_orow`` and
    ``conv2d_winograd``."""
    batch, i_chunks, height, width, ib = (int(d) for d in data.shape)
    alpha, _, c_in, c_out = (int(d) for d in weights.shape)
    m = alpha - 2
    a_mat, b_mat, _ = winograd_matrices(m)
    top, left, bottom, right = (int(p) for p in padding)
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    n_h, n_w = -(-out_h // m), -(-out_w // m)
    tiles = batch * n_h * n_w
    pad = topi.nn.pad(data, (0, 0, top, left, 0),
                      (0, 0, n_h * m + 2 - height - top, n_w * m + 2 - width - left, 0),
                      name="data_pad")

    def tile_origin(p):
        return p // (n_h * n_w), p % (n_h * n_w) // n_w * m, p % n_w * m

    def rows(p, cc, a, n, k):
        b, y, x = tile_origin(p)
        return _pick(n, [_terms((b_mat[col, j], pad[b, cc, y + a, x + col, k])
                                for col in range(alpha)) for j in range(alpha)])

    d_b = te.compute((tiles, i_chunks, alpha, alpha, ib), rows, name="winograd_rows")
    v = te.compute(
        (alpha, alpha, tiles, c_in),
        lambda e, n, p, ci: _pick(e, [_terms((b_mat[row, j], d_b[p, ci // ib, row, n, ci % ib])
                                             for row in range(alpha)) for j in range(alpha)]),
        name="winograd_V")
    ci = te.reduce_axis((0, c_in), "ci")
    mm = te.compute((alpha, alpha, tiles, c_out),
                    lambda e, n, p, co: te.sum(v[e, n, p, ci] * weights[e, n, ci, co], axis=ci),
                    name="winograd_M")
    ob = out_block
    m_a = te.compute(
        (tiles, c_out // ob, alpha, m, ob),
        lambda p, oc, e, x, k: _pick(x, [_terms((a_mat[n, j], mm[e, n, p, oc * ob + k])
                                                for n in range(alpha)) for j in range(m)]),
        name="winograd_orow")

    def output(b, oc, y, x, k):
        p = (b * n_h + y // m) * n_w + x // m
        return _pick(y % m, [_terms((a_mat[e, j], m_a[p, oc, e, x % m, k])
                                    for e in range(alpha)) for j in range(m)])

    return te.compute((batch, c_out // ob, out_h, out_w, ob), output, name="conv2d_winograd")


# -- analysis --------------------------------------------------------------------------------------
def winograd_key(call: relax.Call) -> str:
    """What a measured Winograd choice is kept under: the packed convolution's batch, input
    channels and size, padding and output channels (``1x64x56x56/1,1,1,1->64``)."""
    batch, i_chunks, height, width, ib = static_shape(call.args[0])
    c_out = static_shape(call)[1] * static_shape(call)[4]
    pad = ",".join(str(int(p)) for p in call.attrs.padding)
    return f"{batch}x{i_chunks * ib}x{height}x{width}/{pad}->{c_out}"


def plan_winograd(func: relax.Function, tiles: Mapping[str, int] | None = None
                  ) -> dict[relax.Var, int]:
    """The packed 3x3 stride-1 convolutions of ``func`` to run as Winograd, by the variable
    they bind, with their output tile ``m``: the tile measured on the device for that
    convolution (``tiles[winograd_key(call)]``, 0 for direct) where there is one, else
    :func:`winograd_tile`'s prediction."""
    plan: dict[relax.Var, int] = {}
    if not isinstance(func.body, relax.SeqExpr):
        return plan
    weights = _weights(func)
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(binding, relax.VarBinding) and _eligible(call, weights):
                batch, o_chunks, height, width, ob = static_shape(binding.var)
                _, i_chunks, _, _, ib = static_shape(call.args[0])
                key = winograd_key(call)
                tile = tiles[key] if tiles and key in tiles else \
                    winograd_tile(batch, height, width, i_chunks * ib, o_chunks * ob)
                if tile:
                    plan[binding.var] = tile
            if isinstance(binding, relax.VarBinding) and _only_weights(call, weights):
                weights.add(binding.var)
    return plan


def eligible_convs(func: relax.Function) -> list[relax.Call]:
    """The packed convolutions of ``func`` Winograd could compute (whatever it is predicted
    to gain): what a device measures both ways."""
    found = []
    if not isinstance(func.body, relax.SeqExpr):
        return found
    weights = _weights(func)
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                if _eligible(binding.value, weights):
                    found.append(binding.value)
                if _only_weights(binding.value, weights):
                    weights.add(binding.var)
    return found


def _weights(func: relax.Function) -> set[relax.Var]:
    """The parameters that are weights: those after ``num_input`` (none if it is unset)."""
    if not func.attrs or "num_input" not in func.attrs:
        return set()
    return set(func.params[int(func.attrs["num_input"]):])


def _only_weights(expr: relax.Expr, weights: set[relax.Var]) -> bool:
    """Whether ``expr`` reads nothing but constants and ``weights``."""
    found = []
    relax.analysis.post_order_visit(
        expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return all(v in weights for v in found)


def _eligible(call: relax.Expr, weights: set[relax.Var]) -> bool:
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.nn.conv2d")):
        return False
    a = call.attrs
    data, kernel = call.args
    if not (_PACKED.match(a.data_layout) and _PACKED.match(a.out_layout)
            and _KERNEL.match(a.kernel_layout)):
        return False
    try:
        k = static_shape(kernel)
        static_shape(data)
        static_shape(call)
    except Exception:  # dynamic shapes: leave the convolution alone
        return False
    return (_unit_3x3(a, k)
            and str(data.ty.dtype) == str(kernel.ty.dtype) == "float32"
            and str(a.out_dtype) in ("", "void", "None", "float32")
            and _only_weights(kernel, weights))


# -- rewrite ---------------------------------------------------------------------------------------
@tvm.transform.module_pass(opt_level=0, name="WinogradConv")
class WinogradConv:
    """Run the convolutions :func:`plan_winograd` picks as Winograd: each becomes the
    kernel's transform (:func:`winograd_weights`, a function of the weights only, so
    ``LiftTransformParams`` moves it to compile time) and :func:`conv2d_winograd`.
    ``tiles``: choices measured on the device (see :func:`plan_winograd`)."""

    def __init__(self, tiles: Mapping[str, int] | None = None):
        self.tiles = dict(tiles or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans = {gv: plan_winograd(f, self.tiles) for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function)}
        return rewrite_bindings(mod, plans, _winograd)


def _winograd(bb: relax.BlockBuilder, call: relax.Call, args, tile: int) -> relax.Expr:
    data, kernel = args
    _, _, g = winograd_matrices(tile)
    u = bb.emit(bb.call_te(winograd_weights, kernel, relax.const(g),
                           primfunc_name_hint="winograd_weights"))
    return bb.call_te(conv2d_winograd, data, u, [int(p) for p in call.attrs.padding],
                      int(_PACKED.match(call.attrs.out_layout).group(1)),
                      primfunc_name_hint="conv2d_winograd_NCHWc")
