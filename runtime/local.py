"""Run a whole plan in one process: every device's pieces, tensors handed over in memory.

For checking a compile on one machine; ``splitc serve``/``splitc run`` over ZeroMQ do the same
across boards. Counts the bytes the plan sends between devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import DeviceArtifact
from .plan import Plan, PlanError


@dataclass
class RunStats:
    transfer_bytes: int = 0
    input_bytes: int = 0
    output_bytes: int = 0


class LocalSession:
    """All devices of the plan at ``out_dir``, in this process."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.plan = Plan.load(self.out_dir)
        self.devices = {d.name: DeviceArtifact(self.out_dir / d.dir) for d in self.plan.devices}

    def infer(self, *inputs: np.ndarray) -> tuple[list[np.ndarray], RunStats]:
        """Run the plan on the model inputs (in the model's order); returns outputs and stats."""
        plan = self.plan
        if len(inputs) != len(plan.inputs):
            raise PlanError(f"the model takes {len(plan.inputs)} inputs, got {len(inputs)}")
        env: dict[str, np.ndarray] = {}
        stats = RunStats()
        for endpoint, x in zip(plan.inputs, inputs, strict=True):
            want = plan.tensors[endpoint.tensor]
            if tuple(x.shape) != want.shape or str(x.dtype) != want.dtype:
                raise PlanError(f"input {endpoint.name!r} must be {want.dtype}{list(want.shape)}, "
                                f"got {x.dtype}{list(x.shape)}")
            env[endpoint.tensor] = x
            stats.input_bytes += x.nbytes
        env = plan.cut(env)
        for piece in plan.pieces:
            outs = self.devices[piece.device].run(piece, [env[t] for t in piece.inputs])
            env.update(zip(piece.outputs, outs, strict=True))
        stats.transfer_bytes = plan.transfer_bytes
        results = [env[o.tensor] for o in plan.outputs]
        stats.output_bytes = sum(r.nbytes for r in results)
        return results, stats
