"""A model's inputs as a user gives them to ``splitc run``: ``.npy`` files (one per input, in
the model's input order), one ``.npz`` holding every input by name, or image files (PNG, JPEG,
...) resized to the input's height and width and normalised with a mean and a standard
deviation per channel.

Every file is checked before anything runs: it must exist, be what its name says (a ``.npy``
must start with NumPy's magic bytes; pickled data is never loaded) and fit the input's shape
(a missing batch dimension of 1 is added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from splitc.errors import SplitcError

#: File suffixes read as images (with Pillow).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif",
                  ".tiff"}
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape and dtype (from the plan)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def load_inputs(paths: Sequence[str | Path], specs: Sequence[InputSpec], *,
                mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
                ) -> list[np.ndarray]:
    """The arrays for ``specs`` from ``paths``: one file per input, or a single ``.npz``
    holding them all by name. ``mean``/``std``: images only, one value or one per channel
    (applied after scaling pixels to [0, 1])."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise SplitcError(f"input file {p} does not exist")
    if len(paths) == 1 and paths[0].suffix.lower() == ".npz":
        return _from_npz(paths[0], specs)
    if len(paths) != len(specs):
        raise SplitcError(f"the model takes {len(specs)} inputs "
                          f"({', '.join(s.name for s in specs)}), got {len(paths)} --input "
                          "files (give one per input in this order, or one .npz holding each "
                          "by name)")
    return [_one(p, s, mean, std) for p, s in zip(paths, specs, strict=True)]


def _from_npz(path: Path, specs: Sequence[InputSpec]) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except (ValueError, OSError) as e:
        raise SplitcError(f"{path} is not a readable .npz file: {e}") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise SplitcError(f"{path} has no array named {', '.join(map(repr, missing))} (it "
                          f"holds {', '.join(arrays) or 'nothing'}; the model's inputs are "
                          f"{', '.join(s.name for s in specs)})")
    return [_fit(arrays[s.name], s, f"{path}[{s.name}]") for s in specs]


def _one(path: Path, spec: InputSpec, mean, std) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return image(path, spec, mean, std)
    if suffix == ".npz":
        raise SplitcError(f"{path}: an .npz gives every input by name; give it alone")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head != _NPY_MAGIC:
        raise SplitcError(f"{path} is not a .npy file (it does not start with NumPy's magic "
                          "bytes; save arrays with numpy.save, or give an image file)")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: never loaded
        raise SplitcError(f"{path} holds {'pickled objects' if 'pickle' in str(e) else e}, "
                          "not a numeric array") from None
    return _fit(x, spec, str(path))


def _fit(x: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise SplitcError(f"{what}: input {spec.name!r} must be numeric ({spec.dtype}), the "
                          f"file holds {x.dtype}")
    if tuple(x.shape) == spec.shape[1:] and spec.shape[:1] == (1,):
        x = x[None]  # the batch dimension of one, left out
    if tuple(x.shape) != spec.shape:
        raise SplitcError(f"{what}: input {spec.name!r} must have shape {list(spec.shape)}, "
                          f"the file holds {list(x.shape)}")
    return np.ascontiguousarray(x.astype(spec.dtype, copy=False))


def image(path: Path, spec: InputSpec, mean: Sequence[float] = (0.0,),
          std: Sequence[float] = (1.0,)) -> np.ndarray:
    """An image file as input ``spec`` (NCHW, 1 or 3 channels): resized to its height and
    width (bilinear), pixels scaled to [0, 1], then ``(x - mean) / std`` per channel; every
    image of the batch is this one."""
    if len(spec.shape) != 4 or spec.shape[1] not in (1, 3):
        raise SplitcError(f"{path}: an image fits an input of shape (N, 1 or 3, H, W); "
                          f"input {spec.name!r} is {list(spec.shape)}")
    n, c, h, w = spec.shape
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB" if c == 3 else "L").resize(
                (w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise SplitcError(f"{path} is not a readable image: {e}") from None
    pixels = pixels.reshape(h, w, c).transpose(2, 0, 1)
    m, s = _per_channel(mean, c, "--mean"), _per_channel(std, c, "--std")
    if np.any(s == 0):
        raise SplitcError("--std must not be 0")
    x = (pixels - m[:, None, None]) / s[:, None, None]
    return np.ascontiguousarray(np.broadcast_to(x, (n, c, h, w)).astype(spec.dtype))


def _per_channel(values: Sequence[float], channels: int, flag: str) -> np.ndarray:
    v = np.asarray(list(values), dtype=np.float32)
    if v.size == 1:
        return np.repeat(v, channels)
    if v.size != channels:
        raise SplitcError(f"{flag}: give one value or one per channel ({channels}), got "
                          f"{v.size}")
    return v
