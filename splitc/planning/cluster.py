"""A cluster description: the devices a user has and the links between them.

Written as TOML or JSON::

    [[devices]]
    name = "pi"          # devices are named pi0, pi1, ... when count > 1
    target = "rpi4"      # a name from `splitc targets`
    count = 2
    memory = "1GiB"      # optional cap (default: the target's memory)
    gflops = 9.5         # optional measured speed (default: profile table or published peak)
    # profile = "pi.json"  # or the table `splitc profile --output` wrote for these devices
    #                      # (relative to this file); gflops or profile, not both

    [network]            # a shared switch: every pair gets this link
    bandwidth = "1Gbit"
    latency = "0.5ms"

    [[links]]            # optional per-pair overrides
    between = ["pi0", "host"]
    bandwidth = "100Mbit"
    latency = "2ms"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from splitc import targets as target_registry
from splitc.errors import SplitcError

_SIZE = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20,
         "gib": 2**30}
_RATE = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "b": 1, "kb": 1e3,
         "mb": 1e6, "gb": 1e9}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def _parse(value, table: dict[str, float], what: str, suffix: str = "") -> float:
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e-?[0-9]+)?)\s*([a-zA-Zµ]*)\s*", str(value))
    unit = m.group(2).lower().removesuffix(suffix) if m else None
    if not m or unit not in table:
        raise SplitcError(f"cannot read {what} {value!r} (units: "
                          f"{', '.join(k + suffix for k in table if k)})")
    return float(m.group(1)) * table[unit]


def parse_bytes(value) -> float:
    return _parse(value, _SIZE, "size")


def parse_rate(value) -> float:
    """Bytes per second from ``"1Gbit"``, ``"100Mbit/s"``, ``"12.5MB/s"`` or a number."""
    return _parse(str(value).removesuffix("/s") if isinstance(value, str) else value, _RATE,
                  "bandwidth")


def parse_time(value) -> float:
    return _parse(value, _TIME, "latency")


#: A network nobody described: a 1 Gbit/s switch (bytes per second), 0.5 ms per message.
DEFAULT_BANDWIDTH = 125e6
DEFAULT_LATENCY = 0.5e-3


#: What a device may be called (it names its folder, its keys and its messages).
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
#: Names the runtime keeps for itself.
RESERVED_NAMES = {"client"}


def target(name: str, origin: str = "") -> target_registry.TargetSpec:
    """The target called ``name``; an unknown one is the user's error (SplitcError)."""
    try:
        return target_registry.get(name)
    except target_registry.TargetError as e:
        raise SplitcError(f"{origin}: {e}" if origin else str(e)) from None


def device_names(n: int) -> list[str]:
    """The names of ``n`` devices nobody named (no cluster file): dev0, dev1, ..."""
    return [f"dev{i}" for i in range(n)]


@dataclass(frozen=True)
class ClusterDevice:
    name: str
    target: str
    memory: float  # bytes
    gflops: float | None = None  # measured speed, if the user gave one
    profile: str | None = None  # or the table `splitc profile` measured for this device


@dataclass(frozen=True)
class Link:
    bytes_per_second: float
    latency: float  # seconds per message

    def seconds(self, nbytes: float) -> float:
        """One message alone on the link, in one line: bytes / bandwidth + latency (the cost
        model adds what other messages leaving with it take of the link)."""
        return nbytes / self.bytes_per_second + self.latency


@dataclass(frozen=True)
class Cluster:
    devices: tuple[ClusterDevice, ...]
    network: Link
    links: dict[frozenset[str], Link] = field(default_factory=dict)

    def link(self, a: str, b: str) -> Link:
        return self.links.get(frozenset((a, b)), self.network)

    @property
    def targets(self) -> list[str]:
        return [d.target for d in self.devices]

    @classmethod
    def uniform(cls, targets: list[str], bandwidth: float = DEFAULT_BANDWIDTH,
                latency: float = DEFAULT_LATENCY) -> Cluster:
        """Devices from target names on one shared switch (default 1 Gbit/s, 0.5 ms)."""
        devs = tuple(ClusterDevice(name, t, float(target(t).resolved_memory))
                     for name, t in zip(device_names(len(targets)), targets, strict=True))
        return cls(devs, Link(bandwidth, latency))

    @classmethod
    def from_dict(cls, data: dict, origin: str = "cluster", base: Path | None = None
                  ) -> Cluster:
        """``base``: the folder a device's relative ``profile`` path starts from (the cluster
        file's; default the working directory)."""
        if not isinstance(data.get("devices"), list) or not data["devices"]:
            raise SplitcError(f"{origin}: needs a non-empty [[devices]] list")
        devices = []
        for entry in data["devices"]:
            if "target" not in entry:
                raise SplitcError(f"{origin}: a device entry has no target: {entry}")
            spec = target(entry["target"], origin)
            count = int(entry.get("count", 1))
            name = entry.get("name", spec.name)
            memory = parse_bytes(entry.get("memory", spec.resolved_memory))
            gflops = entry.get("gflops")
            profile = entry.get("profile")
            if profile is not None:
                if not isinstance(profile, str):
                    raise SplitcError(f"{origin}: device {name}: profile must be a file path, "
                                      f"not {profile!r}")
                if gflops:
                    raise SplitcError(f"{origin}: device {name}: give gflops or profile, "
                                      "not both")
                path = (base or Path()) / Path(profile).expanduser()
                if not path.is_file():
                    raise SplitcError(f"{origin}: device {name}: profile {path} does not "
                                      "exist (write one with `splitc profile --output`)")
                profile = str(path)
            for i in range(count):
                devices.append(ClusterDevice(f"{name}{i}" if count > 1 else name, spec.name,
                                             memory, float(gflops) if gflops else None,
                                             profile))
        names = [d.name for d in devices]
        bad = [n for n in names if not NAME_RE.match(n) or n in RESERVED_NAMES]
        if bad:
            raise SplitcError(f"{origin}: device name(s) {', '.join(map(repr, bad))}: a name "
                              "starts with a letter and has letters, digits, - and _ (it "
                              "names the device's folder); 'client' is reserved")
        if len(set(names)) != len(names):
            raise SplitcError(f"{origin}: device names repeat: {names}")
        net = data.get("network", {})
        network = Link(parse_rate(net.get("bandwidth", "1Gbit")),
                       parse_time(net.get("latency", "0.5ms")))
        links = {}
        for entry in data.get("links", []):
            pair = entry.get("between", [])
            if len(pair) != 2 or any(p not in names for p in pair):
                raise SplitcError(f"{origin}: link {pair} must name two devices of {names}")
            links[frozenset(pair)] = Link(
                parse_rate(entry.get("bandwidth", network.bytes_per_second)),
                parse_time(entry.get("latency", network.latency)))
        return cls(tuple(devices), network, links)

    @classmethod
    def load(cls, path: str | Path) -> Cluster:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SplitcError(f"cannot read cluster file {path}: {e.strerror}") from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import tomllib

                data = tomllib.loads(text)
        except (ValueError, json.JSONDecodeError) as e:
            raise SplitcError(f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: "
                              f"{e}") from None
        return cls.from_dict(data, str(path), path.parent)
