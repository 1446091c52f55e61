"""The output folder: one folder per device, built by its target's kind, and ``plan.json``.

``OUT/plan.json`` (and a copy in every device folder, so a board needs only its own folder),
``OUT/<device>/`` with what the device's kind builds (a TVM library and ``weights.npz``, or
FPGA projects and their manifest), and any extra files the strategy keeps (a branch plan's
``branch.json``, the model's ``reference.json``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tvm

from splitc import targets as target_registry
from splitc.backend.kinds import BuildOptions, kind_of
from splitc.errors import SplitcError
from splitc.runtime.plan import Plan, sha256_file

Log = Callable[[str], None]


def prepare_folder(out_dir: str | Path) -> Path:
    """An empty output folder: a new one, or the previous output of a compile (replaced);
    anything else is refused, so a wrong ``-o`` never deletes a user's files."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir() or (not (out / "plan.json").exists() and any(out.iterdir())):
            raise SplitcError(f"{out} exists and is not a splitc output folder; choose "
                              "another -o")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def write(out_dir: str | Path, plan: Plan, modules: Mapping[str, tvm.IRModule],
          weights: Mapping[str, list[np.ndarray]], *, options: BuildOptions | None = None,
          files: Mapping[str, str | bytes] | None = None, log: Log = lambda _m: None) -> Plan:
    """Build every device of ``plan`` for its target and write ``out_dir``.

    ``modules``: each device's pieces by device name (weights lifted; a device the split left
    idle has none); ``weights``: each piece's weights; ``files``: extra files for the folder.
    Returns the plan with library hashes filled in, as written to ``plan.json``."""
    out = prepare_folder(out_dir)
    options = options or BuildOptions()
    built, num_weights = [], {}
    for dev in plan.devices:
        folder = out / dev.dir
        folder.mkdir()
        spec = target_registry.get(dev.target)
        module = modules.get(dev.name)
        if module is None:  # e.g. a spatial split of a model with no row-local layers
            log(f"warning: the {plan.strategy} split gives {dev.name} nothing to do")
            np.savez(folder / dev.weights)
            built.append(dataclasses.replace(dev, lib="", lib_sha256="",
                                             weights_sha256=sha256_file(folder / dev.weights)))
            continue
        result = kind_of(spec).build_device(dev, spec, module, weights, plan, folder, options,
                                            log)
        built.append(result.device)
        num_weights.update(result.num_weights)
    pieces = tuple(dataclasses.replace(p, num_weights=num_weights.get(p.name, p.num_weights))
                   for p in plan.pieces)
    plan = dataclasses.replace(plan, pieces=pieces, devices=tuple(built))
    plan.save(out / "plan.json")
    for dev in plan.devices:
        plan.save(out / dev.dir / "plan.json")
    for name, content in (files or {}).items():
        path = out / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return plan


def check(out_dir: str | Path, plan: Plan, mod: tvm.IRModule, examples: np.ndarray,
          options: BuildOptions, log: Log = lambda _m: None) -> None:
    """Each kind of the plan's devices checks its devices against ``mod`` on ``examples``
    (the FPGA kind: fixed-point top-1 agreement); a failed check removes the folder."""
    kinds = {kind_of(target_registry.get(d.target)) for d in plan.devices}
    try:
        for kind in sorted(kinds, key=lambda k: k.name):
            kind.check(Path(out_dir), mod, examples, options, log)
    except SplitcError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def needs_check(plan: Plan) -> bool:
    """Whether any device's kind is not exact, and so checks its pieces after the build."""
    return any(not kind_of(target_registry.get(d.target)).exact for d in plan.devices)
