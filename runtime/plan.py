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
        """The plan ``d`` (as :meth:`to_dict` writes it), checked field by field first: a
        malformed one raises :class:`PlanError` naming the field (see :func:`validate`)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise PlanError(f"not a {FORMAT} plan (format: {got!r})")
        validate(d)
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


#: The largest tensor a plan may name (bytes): more than any board holds.
MAX_TENSOR_BYTES = 1 << 36
_HEX = frozenset("0123456789abcdef")


def validate(d: dict) -> None:
    """Check every field of a plan dict before it is used: types, names that refer to
    something the plan has, shapes of non-negative integers with a size a board can hold,
    known dtypes, file names that stay inside the device folder, and SHA-256 hashes that are
    64 hex digits or empty (a board refuses an empty one, see
    :class:`~splitc.runtime.artifact.DeviceArtifact`). Raises :class:`PlanError` naming the
    first bad field."""

    def need(ok: bool, where: str, what: str, value: Any = None) -> None:
        if not ok:
            shown = repr(value)
            raise PlanError(f"plan field {where}: {what}"
                            + ("" if value is None else
                               f", got {shown[:80]}{'…' if len(shown) > 80 else ''}"))

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    def is_file_name(x: Any) -> bool:
        return (isinstance(x, str) and x not in ("", ".", "..") and "/" not in x
                and "\\" not in x and "\0" not in x)

    def records(key: str, fields: dict[str, type], optional: dict | None = None) -> list:
        optional = optional or {}
        items = d.get(key, [] if key == "slices" else None)
        need(isinstance(items, list), key, "must be a list", items)
        for i, x in enumerate(items):
            need(isinstance(x, dict), f"{key}[{i}]", "must be an object", x)
            for name, kind in {**fields, **optional}.items():
                if name not in x and name in optional:
                    continue
                need(name in x, f"{key}[{i}]", f"has no {name!r}")
                ok = is_int(x[name]) if kind is int else isinstance(x[name], kind)
                need(ok, f"{key}[{i}].{name}", f"must be {_KIND.get(kind, kind)}", x[name])
        return items

    need(isinstance(d.get("strategy"), str), "strategy", "must be a string", d.get("strategy"))
    need(isinstance(d.get("model"), dict), "model", "must be an object", d.get("model"))
    need(isinstance(d["model"].get("source", ""), str), "model.source", "must be a string")
    need(isinstance(d.get("versions", {}), dict), "versions", "must be an object")
    tensors = d.get("tensors")
    need(isinstance(tensors, dict), "tensors", "must be an object", tensors)
    for name, t in tensors.items():
        where = f"tensors[{name!r}]"
        need(isinstance(t, dict), where, "must be an object", t)
        shape, dtype = t.get("shape"), t.get("dtype")
        need(isinstance(shape, list) and len(shape) <= 16 and all(map(is_int, shape)),
             f"{where}.shape", "must be a list of at most 16 non-negative integers", shape)
        need(dtype in _BITS, f"{where}.dtype", f"must be one of {', '.join(sorted(_BITS))}",
             dtype)
        nbytes = math.prod(shape) * _BITS[dtype] // 8
        need(nbytes <= MAX_TENSOR_BYTES, where, f"{nbytes} bytes is more than any board holds")
    devices = records("devices", {"name": str, "target": str, "index": int, "dir": str},
                      {"lib": str, "weights": str, "lib_sha256": str, "weights_sha256": str})
    names = set()
    for i, x in enumerate(devices):
        need(x["name"] not in names and x["name"] != "client" and x["name"] != "",
             f"devices[{i}].name", "must be unique, not empty and not 'client'", x["name"])
        names.add(x["name"])
        for key in ("dir", "lib", "weights"):
            if key in x and not (key == "lib" and x[key] == ""):  # (an idle device: none)
                need(is_file_name(x[key]), f"devices[{i}].{key}",
                     "must be a file name inside the output folder", x[key])
        for key in ("lib_sha256", "weights_sha256"):
            digest = x.get(key, "")
            need(digest == "" or (len(digest) == 64 and set(digest) <= _HEX),
                 f"devices[{i}].{key}", "must be 64 hex digits (or empty)", digest)
    pieces = records("pieces", {"name": str, "device": str, "inputs": list, "outputs": list},
                     {"num_weights": int, "flops": int, "weight_bytes": int})
    libraries = {x["name"]: x.get("lib", "lib.so") for x in devices}
    for i, x in enumerate(pieces):
        need(x["device"] in names, f"pieces[{i}].device", "must be a device of the plan",
             x["device"])
        need(libraries[x["device"]] != "", f"pieces[{i}].device",
             "has pieces but no library (devices[].lib is empty)", x["device"])
        for key in ("inputs", "outputs"):
            for t in x[key]:
                need(isinstance(t, str) and t in tensors, f"pieces[{i}].{key}",
                     "must name tensors of the plan", t)
    for i, x in enumerate(records("transfers", {"tensor": str, "src": str, "dst": str,
                                                "bytes": int})):
        need(x["tensor"] in tensors, f"transfers[{i}].tensor", "must be a tensor of the plan",
             x["tensor"])
        for key in ("src", "dst"):
            need(x[key] in names, f"transfers[{i}].{key}", "must be a device of the plan",
                 x[key])
    for key in ("inputs", "outputs"):
        for i, x in enumerate(records(key, {"name": str, "tensor": str}, {"device": str})):
            need(x["tensor"] in tensors, f"{key}[{i}].tensor", "must be a tensor of the plan",
                 x["tensor"])
    records("slices", {"tensor": str, "source": str, "axis": int, "begin": int, "end": int})


_KIND = {int: "a non-negative integer", str: "a string", list: "a list", dict: "an object"}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
