"""Fallback plans: what the cluster runs when devices of the main plan are lost for good.

``splitc compile --spares K`` plans, besides the main plan, one plan for every set of up to
K of the main plan's devices being lost, over the devices that remain (the same planning the
main plan had). The client switches every surviving worker to the plan for the devices that
are down once they have been down for ``failover_after`` seconds, and back when they return
(:mod:`splitc.runtime.client`); a worker serves every plan its folder holds, and a setup
names the one to use by its digest (:mod:`splitc.runtime.worker`).

This module is part of the board runtime: it imports only the standard library and the plan.

On disk (a folder without ``fallbacks.json`` is a single-plan folder, as before)::

    OUT/plan.json                           the main plan (unchanged)
    OUT/fallbacks.json                      the index: format, spares, main (its digest),
                                            plans [{name, lost, digest, devices, strategy,
                                            label}], compile_seconds {main, fallbacks},
                                            bytes {main, fallbacks}
    OUT/fallbacks/<name>/plan.json          the fallback plan for losing <name>'s devices
    OUT/<dev>/plan.json, lib.so, weights.npz        the main plan's, as before
    OUT/<dev>/fallbacks/<name>/plan.json    a copy of each fallback plan <dev> has pieces in
    OUT/<dev>/lib-<sha256[:16]>.so          the files of the fallback plans, named by their
    OUT/<dev>/weights-<sha256[:16]>.npz       content: a file two plans share is stored once
                                              (a fallback's file equal to the main plan's is
                                              the main plan's ``lib.so`` / ``weights.npz``)

``<name>`` is the lost devices' names joined by ``+`` in the main plan's order (``dev1``,
``dev0+dev2``); device names never hold a ``+``. A fallback plan is an ordinary plan
(:class:`~splitc.runtime.plan.Plan`) whose devices are survivors, named as in the main plan,
with ``dir`` their own folder and ``lib`` / ``weights`` file names in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .plan import Plan, PlanError

FORMAT = "splitc-fallbacks/1"
INDEX = "fallbacks.json"
FOLDER = "fallbacks"
#: Joins the lost devices' names into a fallback's name.
SEP = "+"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}(\+[A-Za-z][A-Za-z0-9_-]{0,63})*$")


def name_of(lost: Iterable[str]) -> str:
    """The name of the fallback for losing ``lost`` (in the main plan's device order)."""
    return SEP.join(lost)


@dataclass(frozen=True)
class Fallback:
    """One fallback plan: the devices it is for losing, and the plan over the others."""

    name: str
    lost: tuple[str, ...]
    plan: Plan
    label: str = ""

    @property
    def active(self) -> list[str]:
        """The devices with pieces in it (the ones a switch sets up)."""
        return [d.name for d in self.plan.devices if self.plan.pieces_on(d.name)]


def load(out_dir: str | Path, main: Plan) -> list[Fallback]:
    """The fallback plans of a compiled folder (none for a folder compiled without
    ``--spares``). Each is checked against the index (its digest, its devices: the main
    plan's, less the ones it is for losing); a mismatch is a :class:`PlanError` naming it."""
    out = Path(out_dir)
    path = out / INDEX
    if not path.exists():
        return []
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path} is not readable: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise PlanError(f"{path} is not a {FORMAT} index")
    if index.get("main") != main.digest():
        raise PlanError(f"{path} belongs to another compile than {out / 'plan.json'} (main "
                        f"plan digest {index.get('main')!r}, the plan's is {main.digest()}): "
                        "compile again")
    names = {d.name for d in main.devices}
    found = []
    for i, entry in enumerate(index.get("plans") or []):
        if not isinstance(entry, dict):
            raise PlanError(f"{path}: plans[{i}] must be an object")
        name, lost = entry.get("name"), entry.get("lost")
        if not isinstance(name, str) or not _NAME.match(name) or not isinstance(lost, list) \
                or name != name_of(lost) or not set(lost) <= names:
            raise PlanError(f"{path}: plans[{i}] has a malformed name or lost devices "
                            f"({name!r}, {lost!r})")
        plan = Plan.load(out / FOLDER / name / "plan.json")
        if plan.digest() != entry.get("digest"):
            raise PlanError(f"{out / FOLDER / name / 'plan.json'} does not match its digest "
                            f"in {path}: compile again")
        stray = sorted({d.name for d in plan.devices} - (names - set(lost)))
        if stray:
            raise PlanError(f"the fallback plan for losing {name} uses {', '.join(stray)}")
        found.append(Fallback(name, tuple(lost), plan, str(entry.get("label", ""))))
    return found


def write_index(out_dir: str | Path, main: Plan, spares: int, fallbacks: Sequence[Fallback],
                **figures) -> None:
    """Write ``OUT/fallbacks.json`` for ``fallbacks`` (written already) of the main plan;
    ``figures``: what they cost (``compile_seconds``, ``bytes``), kept for reports."""
    index = {"format": FORMAT, "spares": spares, "main": main.digest(),
             "plans": [{"name": f.name, "lost": list(f.lost), "digest": f.plan.digest(),
                        "devices": f.active, "strategy": f.plan.strategy, "label": f.label}
                       for f in fallbacks], **figures}
    (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=1))


def read_index(out_dir: str | Path) -> dict | None:
    """``OUT/fallbacks.json`` as written (None when the folder has no fallbacks)."""
    path = Path(out_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise PlanError(f"{path} is not readable: {e}") from None


def device_plans(folder: str | Path) -> dict[str, Path]:
    """The fallback plans a device folder holds: name -> its plan.json (the folder's own
    ``plan.json`` is the main plan)."""
    root = Path(folder) / FOLDER
    if not root.is_dir():
        return {}
    return {p.name: p / "plan.json" for p in sorted(root.iterdir())
            if _NAME.match(p.name) and (p / "plan.json").is_file()}
