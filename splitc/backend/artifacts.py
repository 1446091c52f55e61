"""The output folder: one folder per device, built by its target's kind, and ``plan.json``.

``OUT/plan.json`` (and a copy in every device folder, so a board needs only its own folder),
``OUT/<device>/`` with what the device's kind builds (a TVM library and ``weights.npz``, or
FPGA projects and their manifest), and any extra files the strategy keeps (a branch plan's
``branch.json``, the model's ``reference.json``). With ``--spares`` the fallback plans are
added to the same folder (:func:`write_fallback`; the layout is
:mod:`splitc.runtime.fallback`'s): their files named by content, so a file several plans
share is stored once per device folder, and a device built once per compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tvm

from splitc import targets as target_registry
from splitc.backend.kinds import BuildOptions, kind_of
from splitc.errors import SplitcError
from splitc.runtime import fallback as fallback_format
from splitc.runtime.plan import Device, Plan, sha256_file

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
          files: Mapping[str, str | bytes] | None = None, log: Log = lambda _m: None,
          progress: Callable[[float, str], None] | None = None) -> Plan:
    """Build every device of ``plan`` for its target and write ``out_dir``.

    ``modules``: each device's pieces by device name (weights lifted; a device the split left
    idle has none); ``weights``: each piece's weights; ``files``: extra files for the folder;
    ``progress(fraction done, text)``: told before each device is built.
    Returns the plan with library hashes filled in, as written to ``plan.json``."""
    out = prepare_folder(out_dir)
    options = options or BuildOptions()
    built, num_weights = [], {}
    for i, dev in enumerate(plan.devices):
        if progress:
            progress(i / len(plan.devices), f"building {dev.name} ({dev.target})")
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


def kind_exact(target: str) -> bool:
    """Whether devices of ``target`` give the model's answer up to float rounding (else their
    kind checks them after the build)."""
    return kind_of(target_registry.get(target)).exact


def needs_check(plan: Plan) -> bool:
    """Whether any device's kind is not exact, and so checks its pieces after the build."""
    return any(not kind_of(target_registry.get(d.target)).exact for d in plan.devices)


class BuildCache:
    """Devices built once per compile: a device of a fallback plan whose pieces, weights and
    target are those of a device built before (the same stage of the same split over other
    survivors) takes its files instead of building again. Built files wait in a scratch
    folder until :meth:`close`."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="splitc-build-"))
        self._built: dict[str, tuple[Path, Device, dict[str, int]]] = {}
        self.hits = 0

    def build(self, dev: Device, plan: Plan, module: tvm.IRModule,
              weights: Mapping[str, list[np.ndarray]], options: BuildOptions, log: Log
              ) -> tuple[Path, Device, dict[str, int]]:
        """``dev``'s files (in a scratch folder: ``dev.lib``, ``dev.weights``), the device as
        built (hashes, kind) and each piece's number of weights."""
        key = _build_key(dev, plan, module, weights)
        if key in self._built:
            self.hits += 1
            log(f"{dev.name}: the same pieces and weights as a device built before: not "
                "built again")
            return self._built[key]
        folder = self.folder / str(len(self._built))
        folder.mkdir()
        spec = target_registry.get(dev.target)
        result = kind_of(spec).build_device(dev, spec, module, weights, plan, folder, options,
                                            log)
        self._built[key] = (folder, result.device, dict(result.num_weights))
        return self._built[key]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _build_key(dev: Device, plan: Plan, module: tvm.IRModule,
               weights: Mapping[str, list[np.ndarray]]) -> str:
    """What a device's build depends on: its target, its module (as TVMScript: the weights
    are parameters, so the text is small) and its pieces' names and weights."""
    h = hashlib.sha256(f"{dev.target}|{module.script()}".encode())
    for p in plan.pieces_on(dev.name):
        h.update(p.name.encode())
        for w in weights[p.name]:
            a = np.ascontiguousarray(w)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def write_fallback(out_dir: str | Path, name: str, plan: Plan, main: Plan,
                   modules: Mapping[str, tvm.IRModule],
                   weights: Mapping[str, list[np.ndarray]], cache: BuildCache, *,
                   options: BuildOptions | None = None, log: Log = lambda _m: None) -> Plan:
    """Add the fallback plan ``name`` (for losing the devices it names) to an output folder
    the main plan ``main`` was written to: each of its devices' files go into that device's
    folder named by their content (``lib-<sha256[:16]>.so``, or the main plan's file when
    it is the same), the plan to ``OUT/fallbacks/<name>/plan.json`` and a copy into the
    folder of every device with pieces in it. Returns the plan as written."""
    out = Path(out_dir)
    options = options or BuildOptions()
    built, num_weights = [], {}
    for dev in plan.devices:
        folder = out / dev.dir
        mine = main.device(dev.name)
        module = modules.get(dev.name)
        if module is None:  # left idle: an empty weights file, no library
            scratch = cache.folder / f"idle-{dev.name}.npz"
            np.savez(scratch)
            wname = _store(folder, scratch, "weights", mine.weights, mine.weights_sha256)
            built.append(dataclasses.replace(dev, lib="", lib_sha256="", weights=wname,
                                             weights_sha256=sha256_file(folder / wname)))
            continue
        src, made, counts = cache.build(dev, plan, module, weights, options, log)
        lib = _store(folder, src / made.lib, "lib", mine.lib, mine.lib_sha256)
        wname = _store(folder, src / made.weights, "weights", mine.weights,
                       mine.weights_sha256)
        built.append(dataclasses.replace(dev, lib=lib, weights=wname, kind=made.kind,
                                         lib_sha256=made.lib_sha256,
                                         weights_sha256=made.weights_sha256))
        num_weights.update(counts)
    pieces = tuple(dataclasses.replace(p, num_weights=num_weights.get(p.name, p.num_weights))
                   for p in plan.pieces)
    plan = dataclasses.replace(plan, pieces=pieces, devices=tuple(built))
    for folder in [out, *(out / d.dir for d in plan.devices if plan.pieces_on(d.name))]:
        path = folder / fallback_format.FOLDER / name
        path.mkdir(parents=True, exist_ok=True)
        plan.save(path / "plan.json")
    return plan


def _store(folder: Path, src: Path, stem: str, main_name: str, main_sha: str) -> str:
    """Put ``src`` into a device folder under a name from its content (the main plan's
    ``main_name`` when it is that file); returns the name."""
    digest = sha256_file(src)
    if main_name and digest == main_sha:
        return main_name
    name = f"{stem}-{digest[:16]}{''.join(src.suffixes) or ''}"
    if not (folder / name).exists():
        shutil.copyfile(src, folder / name)
    return name


def folder_bytes(out_dir: str | Path) -> int:
    """Bytes of every file under ``out_dir``."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
