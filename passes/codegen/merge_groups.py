"""MergeGroups: grouped convolutions with fewer channels per group than a vector holds run
as convolutions of fewer, wider groups, their kernels zero-filled block-diagonally.

ResNeXt-50's first stages have 4 and 8 channels per group. Packed at 4 or 8 channels a
block (:mod:`.pack_layout` keeps a block inside one group), they use a quarter or half of an
AVX-512 register, and every such convolution sits between 1x1 convolutions packed at 16, so
the activations are repacked twice around it: about 7 % of ResNeXt-50's time went to those
layout changes, measured per kernel on an AVX-512 core. Merging ``f`` neighbouring groups into
one, with the kernel entries between different original groups set to zero, gives the
same answer with whole-vector blocks and no repacking, for ``f`` times the multiply-adds of
a convolution that was a few percent of the model's.

:func:`plan_merge` is the analysis (which convolutions, and ``f``); :class:`MergeGroups`
the rewrite. The kernel's expansion is element-wise arithmetic on the weight, so
``LiftTransformParams`` moves it to compile time like the layout changes.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from splitc.passes.ir import plain_conv2d, rewrite_bindings, static_shape


def merge_factor(channels: int, groups: int, per_group_in: int, lanes: int) -> int:
    """How many groups to merge so a group's input channels fill ``lanes`` (1: none)."""
    if groups == 1 or per_group_in == 1 or per_group_in >= lanes or lanes % per_group_in:
        return 1  # regular, depthwise, or already whole vectors
    f = lanes // per_group_in
    return f if groups % f == 0 and channels % lanes == 0 else 1


def plan_merge(func: relax.Function, lanes: int) -> dict[relax.Var, int]:
    """The grouped float32 ``NCHW`` convolutions of ``func`` to merge, with their factor."""
    plan: dict[relax.Var, int] = {}
    if not isinstance(func.body, relax.SeqExpr):
        return plan
    for block in func.body.blocks:
        for binding in block.bindings:
            conv = plain_conv2d(binding.value)
            if conv is None:
                continue
            c_in, c_out, per_group = conv
            groups = int(binding.value.attrs.groups)
            f = merge_factor(c_in, groups, per_group, lanes)
            if f > 1 and c_out % groups == 0:
                plan[binding.var] = f
    return plan


def merged_kernel(bb: relax.BlockBuilder, kernel: relax.Expr, groups: int, f: int) -> relax.Expr:
    """``[C_out, f * per_group, kh, kw]``: each output channel's original kernel at its
    group's place among the ``f`` merged groups, zeros elsewhere."""
    c_out, per_group, kh, kw = static_shape(kernel)
    out_per_group = c_out // groups
    spread = relax.op.reshape(kernel, (groups // f, f, out_per_group, 1, per_group, kh, kw))
    mask = np.eye(f, dtype="float32").reshape(1, f, 1, f, 1, 1, 1)
    diagonal = bb.emit(relax.op.multiply(spread, relax.const(mask)))
    return relax.op.reshape(diagonal, (c_out, f * per_group, kh, kw))


@tvm.transform.module_pass(opt_level=0, name="MergeGroups")
class MergeGroups:
    """Merge the groups of the convolutions :func:`plan_merge` picks.

    Parameters
    ----------
    lanes : int
        fp32 lanes of the target's vector registers: a merged group's input channels.
    """

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans = {gv: plan_merge(f, self.lanes) for gv, f in mod.functions_items()
                 if isinstance(f, relax.Function)}
        return rewrite_bindings(mod, plans, _merged)


def _merged(bb: relax.BlockBuilder, call: relax.Call, args, f: int) -> relax.Expr:
    a = call.attrs
    data, kernel = args
    merged = bb.emit(merged_kernel(bb, kernel, int(a.groups), f))
    return relax.op.nn.conv2d(data, merged, strides=a.strides, padding=a.padding,
                              dilation=a.dilation, groups=int(a.groups) // f,
                              out_dtype=a.out_dtype)
