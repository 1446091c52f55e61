"""The plan: a plain value that says everything needed to run a split model.

``splitc compile`` writes it as ``OUT/plan.json`` (and a copy in every device folder, so a
board needs only its own folder). It round-trips through JSON; the runtime reads nothing else.
This module is part of the board runtime: it imports only the standard library.

Layout of ``plan.json`` (format ``splitc-plan/1``)::

    format, strategy, versions {splitc, tvm}
    model      {source, inputs: [Tensor], outputs: [Tensor]}
    devices    [{name, target, index, dir, lib, weights, lib_sha256, weights_sha256, kind}]
    pieces     [{name, device, inputs: [tensor], outputs: [tensor], num_weights, flops,
                 weight_bytes}]                     # in an order they can run in
    tensors    {name: {shape, dtype, bytes}}
    transfers  [{tensor, src, dst, bytes}]          # device -> device
    inputs     [{name, tensor}]                     # model input name -> tensor name
    outputs    [{name, tensor, device}]             # model output name -> tensor, its device
    slices     [{tensor, source, axis, begin, end}] # parts of model inputs the caller cuts
                                                    # and sends instead of the whole (optional)
    labels     {tensor: what a user calls it}       # for pictures and timelines (optional)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput

FORMAT = "splitc-plan/1"
_BITS = {"float32": 32, "float16": 16, "float64": 64, "int8": 8, "uint8": 8, "int32": 32,
         "int64": 64, "bool": 8, "bfloat16": 16}


class PlanError(BadInput):
    """A plan file that is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _BITS[self.dtype] // 8


@dataclass(frozen=True)
class Device:
    name: str
    target: str
    index: int
    dir: str
    lib: str = "lib.so"
    weights: str = "weights.npz"
    lib_sha256: str = ""
    weights_sha256: str = ""
    #: how the device's pieces are built and loaded: ``tvm`` (a TVM library) or ``hls4ml``
    #: (FPGA projects; ``lib`` is their manifest); see :mod:`splitc.runtime.artifact`
    kind: str = "tvm"


@dataclass(frozen=True)
class Piece:
    name: str
    device: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_weights: int = 0
    flops: int = 0
    weight_bytes: int = 0


@dataclass(frozen=True)
class Transfer:
    tensor: str
    src: str
    dst: str
    nbytes: int


@dataclass(frozen=True)
class Endpoint:
    """A model input or output: the user-facing name and the tensor it is in the plan."""

    name: str
    tensor: str
    device: str = ""


@dataclass(frozen=True)
class Slice:
    """A part of a model input that the caller cuts out and sends instead of the whole
    tensor: ``tensor`` is ``source[begin:end]`` along ``axis`` (a spatial split sends each
    device only the rows its tile reads)."""

    tensor: str
    source: str
    axis: int
    begin: int
    end: int


@dataclass(frozen=True)
class Plan:
    strategy: str
    devices: tuple[Device, ...]
    pieces: tuple[Piece, ...]
    tensors: dict[str, Tensor]
    transfers: tuple[Transfer, ...]
    inputs: tuple[Endpoint, ...]
    outputs: tuple[Endpoint, ...]
    source: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    slices: tuple[Slice, ...] = ()
    #: what a user calls each tensor (the producing layer, with the rows or channels it holds);
    #: for pictures and timelines only (optional)
    labels: dict[str, str] = field(default_factory=dict)

    # -- queries --------------------------------------------------------------------------
    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise PlanError(f"no device {name!r} in the plan (devices: "
                        f"{', '.join(d.name for d in self.devices)})")

    def pieces_on(self, device: str) -> list[Piece]:
        return [p for p in self.pieces if p.device == device]

    @property
    def client_tensors(self) -> list[str]:
        """The tensors the caller sends: the model inputs and the slices cut from them."""
        return [e.tensor for e in self.inputs] + [s.tensor for s in self.slices]

    def cut(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """``arrays`` (model input tensor -> array) with every slice added, contiguous."""
        import numpy as np  # the plan itself stays standard-library only

        out = dict(arrays)
        for s in self.slices:
            index = [slice(None)] * np.ndim(arrays[s.source])
            index[s.axis] = slice(s.begin, s.end)
            out[s.tensor] = np.ascontiguousarray(arrays[s.source][tuple(index)])
        return out

    @property
    def transfer_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    def digest(self) -> str:
        """A hash of the plan's content: every board must hold the same one."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "strategy": self.strategy,
            "versions": dict(self.versions),
            "model": {
                "source": self.source,
                "inputs": [self._io(e) for e in self.inputs],
                "outputs": [self._io(e) for e in self.outputs],
            },
            "devices": [asdict(d) for d in self.devices],
            "pieces": [{**asdict(p), "inputs": list(p.inputs), "outputs": list(p.outputs)}
                       for p in self.pieces],
            "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                        for n, t in self.tensors.items()},
            "transfers": [{"tensor": t.tensor, "src": t.src, "dst": t.dst, "bytes": t.nbytes}
                          for t in self.transfers],
            "inputs": [asdict(e) for e in self.inputs],
            "outputs": [asdict(e) for e in self.outputs],
            **({"slices": [asdict(s) for s in self.slices]} if self.slices else {}),
            **({"labels": dict(self.labels)} if self.labels else {}),
        }

    def _io(self, e: Endpoint) -> dict:
        t = self.tensors[e.tensor]
        return {"name": e.name, "shape": list(t.shape), "dtype": t.dtype}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != FORMAT:
            raise PlanError(f"not a {FORMAT} plan (format: {d.get('format')!r})")
        try:
            plan = cls(
                strategy=d["strategy"],
                devices=tuple(Device(**x) for x in d["devices"]),
                pieces=tuple(Piece(x["name"], x["device"], tuple(x["inputs"]),
                                   tuple(x["outputs"]), x.get("num_weights", 0),
                                   x.get("flops", 0), x.get("weight_bytes", 0))
                             for x in d["pieces"]),
                tensors={n: Tensor(tuple(t["shape"]), t["dtype"]) for n, t in d["tensors"].items()},
                transfers=tuple(Transfer(t["tensor"], t["src"], t["dst"], t["bytes"])
                                for t in d["transfers"]),
                inputs=tuple(Endpoint(**e) for e in d["inputs"]),
                outputs=tuple(Endpoint(**e) for e in d["outputs"]),
                source=d["model"].get("source", ""),
                versions=d.get("versions", {}),
                slices=tuple(Slice(**s) for s in d.get("slices", ())),
                labels={str(k): str(v) for k, v in d.get("labels", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise PlanError(f"plan is missing or has a malformed field: {e}") from e
        try:
            plan._check_slices()
        except TypeError as e:
            raise PlanError(f"plan has a malformed slice: {e}") from e
        return plan

    def _check_slices(self) -> None:
        sources = {e.tensor for e in self.inputs}
        for s in self.slices:
            src = self.tensors.get(s.source)
            if s.source not in sources or s.tensor not in self.tensors or src is None \
                    or not 0 <= s.axis < len(src.shape) \
                    or not 0 <= s.begin < s.end <= src.shape[s.axis]:
                raise PlanError(f"slice {s.tensor!r} of {s.source!r} does not fit the plan's "
                                "model inputs")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read ``path`` (a plan.json, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as e:
            raise PlanError(f"no plan at {path}: run `splitc compile` first") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not a readable plan: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
