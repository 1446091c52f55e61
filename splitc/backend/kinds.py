"""Target kinds: how a device's pieces are built, priced before any measurement, and checked.

A kind is one object per way of making pieces — ``tvm`` (CPUs: a TVM library) and ``hls4ml``
(an FPGA fabric: HLS projects and their C simulation). A target names its kind
(:attr:`splitc.targets.TargetSpec.kind`); the plan records it per device (``Device.kind``),
and the board runtime loads each device by it (:data:`splitc.runtime.artifact.KINDS`). Nothing
else asks whether a target is an FPGA.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm

from splitc import targets as target_registry
from splitc.backend import fpga, tuning
from splitc.backend.build import build
from splitc.backend.tuning_db import database_for
from splitc.errors import SplitcError
from splitc.runtime.plan import Device, Plan, sha256_file

Log = Callable[[str], None]

#: Fraction of a CPU's published peak that splitc's default schedules reach without tuning.
#: Measured on an x86 core (AVX2): ResNet-50 at 224 runs at about 70 GFLOP/s of a ~100
#: GFLOP/s peak; not measured on ARM boards (none here), so a conservative 0.4 stands in.
UNPROFILED_EFFICIENCY = 0.4


@dataclass(frozen=True)
class PublishedSpeed:
    """A device's speed from published or derived figures, before anything was measured.
    ``None`` fields take the cost model's defaults."""

    flops_per_second: float
    source: str
    call_overhead: float | None = None
    weight_bytes_per_second: float | None = None  # None: weights not priced apart
    seconds_per_byte: float | None = None
    tiles_slower: bool = True  # spatial tiles pay the cost model's tile term


@dataclass(frozen=True)
class PiecePrice:
    """What a kind that prices its pieces itself says of one piece: seconds per call on the
    target, or None and why the piece cannot run there; ``note`` says how it was priced."""

    seconds: float | None
    note: str


def select_by_default() -> bool:
    """``SPLITC_SELECT=0`` turns the host's schedule selection off (the test suite does: its
    hundreds of tiny models would each measure their kernels)."""
    return os.environ.get("SPLITC_SELECT", "1") != "0"


@dataclass(frozen=True)
class BuildOptions:
    """What a build of the devices is asked for."""

    schedules: bool = True  # splitc's default schedules (False: TVM's plain lowering)
    tuning_db: str | Path | None = None
    #: before building for the host without a tuning_db: measure the default schedules'
    #: candidates of each kernel not selected on this CPU yet (:mod:`splitc.backend.tuning`)
    select: bool = field(default_factory=select_by_default)
    fpga: fpga.FpgaOptions = field(default_factory=fpga.FpgaOptions)


@dataclass(frozen=True)
class Built:
    """A device folder written: the plan's device with its files and hashes, and how many
    weights each piece takes now (packing can change the number)."""

    device: Device
    num_weights: dict[str, int]


class TargetKind:
    """One way of making a device's pieces (see the module docstring)."""

    #: the plan's and the runtime's name for it
    name = ""
    #: whether its pieces give the model's answer up to float rounding (else: checked)
    exact = True

    def build_device(self, dev: Device, spec: target_registry.TargetSpec,
                     module: tvm.IRModule, weights: dict[str, list[np.ndarray]], plan: Plan,
                     folder: Path, options: BuildOptions, log: Log) -> Built:
        """Build ``dev``'s pieces (``module``; ``weights`` by piece) into ``folder``."""
        raise NotImplementedError

    def published_speed(self, spec: target_registry.TargetSpec) -> PublishedSpeed:
        """How fast the target's pieces run by its published figures."""
        raise NotImplementedError

    def price_piece(self, spec: target_registry.TargetSpec, name: str, func: tvm.relax.Function,
                    options: BuildOptions) -> PiecePrice | None:
        """The seconds one call of piece ``name`` (its Relax function, weights lifted into
        parameters) takes on the target, when the kind knows better than a FLOP rate; None:
        the cost model prices it from the device's speed."""
        return None

    def check(self, out_dir: Path, mod: tvm.IRModule, examples: np.ndarray,
              options: BuildOptions, log: Log) -> None:
        """After the build: refuse the compile (SplitcError) if the devices of this kind do
        not compute ``mod`` well enough on ``examples``. Exact kinds check nothing."""


class TvmKind(TargetKind):
    """CPUs: TVM builds each device's pieces into one library, cross-compiled for boards."""

    name = "tvm"

    def build_device(self, dev, spec, module, weights, plan, folder, options, log):
        own = {p.name: weights[p.name] for p in plan.pieces_on(dev.name)}
        log(f"building {dev.name} ({spec.name}): {len(own)} pieces"
            + ("" if options.schedules else ", plain lowering (no default schedules)"))
        if options.select and options.schedules and spec.is_host and not options.tuning_db:
            select_here(module, spec, lambda msg: log(f"  {dev.name}: {msg}"))
        executable, own = build(module, spec.tvm_target(), own, schedules=options.schedules,
                                log=lambda msg: log(f"  {dev.name}: {msg}"),
                                tuning_db=database_for(spec, options.tuning_db))
        np.savez(folder / dev.weights, **{f"{name}/{i}": w for name, ws in own.items()
                                           for i, w in enumerate(ws)})
        spec.export_library(executable, folder / dev.lib)
        device = dataclasses.replace(dev, lib_sha256=sha256_file(folder / dev.lib),
                                     weights_sha256=sha256_file(folder / dev.weights),
                                     kind=self.name)
        return Built(device, {name: len(ws) for name, ws in own.items()})

    def published_speed(self, spec):
        peak = spec.peak_gflops
        if not peak:
            raise SplitcError(f"no speed known for target {spec.name}: run `splitc profile "
                              f"--target {spec.name}` or give gflops in the cluster file")
        bandwidth = spec.memory_bandwidth_gbs
        return PublishedSpeed(
            peak * 1e9 * UNPROFILED_EFFICIENCY,
            f"published peak {peak} GFLOP/s x {UNPROFILED_EFFICIENCY}"
            + (f", weights at {bandwidth} GB/s" if bandwidth else ""),
            weight_bytes_per_second=bandwidth * 1e9 if bandwidth else None)


def select_here(module: tvm.IRModule, spec: target_registry.TargetSpec, log: Log) -> None:
    """Select the default schedules' best candidates for the kernels of ``module`` not yet
    selected on this CPU (:func:`splitc.backend.tuning.tune` with no trials), into the cache
    the build then reads."""
    tuning.tune(module, spec, None, 0, log=log)


class Hls4mlKind(TargetKind):
    """FPGA fabrics: each piece becomes an hls4ml project and its bit-accurate C simulation
    (:mod:`splitc.backend.fpga`)."""

    name = "hls4ml"
    exact = False  # fixed point

    def build_device(self, dev, spec, module, weights, plan, folder, options, log):
        log(f"building {dev.name} ({spec.name}): {len(plan.pieces_on(dev.name))} pieces "
            "with hls4ml")
        device = fpga.write_device(dev, spec, module, weights, plan, folder, options.fpga, log)
        return Built(device, {})

    def published_speed(self, spec):
        # the fabric's peak, every DSP slice busy: what a split is cut with before its pieces
        # are priced one by one (price_piece); an estimate until synthesis or a board says more
        return PublishedSpeed(
            spec.peak_gflops * 1e9,
            f"FPGA estimate: {spec.fpga['dsp']} DSP slices x {spec.fpga['clock_mhz']} MHz x 2 "
            "FLOP; each piece priced by its hls4ml estimate", call_overhead=spec.fpga.get(
                "call_overhead_s", 1e-4), seconds_per_byte=0.0, tiles_slower=False)

    def price_piece(self, spec, name, func, options):
        """The piece's estimated latency on the fabric (:func:`splitc.backend.fpga.price`:
        its layers, reuse factors chosen to fit, cycles at the clock); None seconds when an
        op is not one the fabric takes or the piece does not fit, with the reason."""
        try:
            priced = fpga.price(func, None, name, spec, options.fpga)
        except SplitcError as e:
            return PiecePrice(None, str(e))
        if not priced.estimate.fits:
            return PiecePrice(None, priced.refusal(spec, options.fpga))
        return PiecePrice(priced.estimate.latency_s,
                          f"{priced.graph.describe()}; {priced.estimate.short()} at "
                          f"{spec.fpga['clock_mhz']} MHz (estimate)")

    def check(self, out_dir, mod, examples, options, log):
        fpga.check_precision(out_dir, mod, examples, options.fpga.min_agreement, log)


KINDS: dict[str, TargetKind] = {k.name: k for k in (TvmKind(), Hls4mlKind())}


def kind_of(spec: target_registry.TargetSpec) -> TargetKind:
    return KINDS[spec.kind]
