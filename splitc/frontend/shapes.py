"""Input shapes, shared by every source: declared dimensions combined with the shapes a
user pins (a dynamic dimension left unpinned is an error naming it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from splitc.errors import SplitcError

#: A declared dimension: a static size, a symbolic name, or None (unknown).
Dim = int | str | None


def resolve_input_shapes(label: str, declared: Sequence[tuple[str, Sequence[Dim] | None]],
                         given: Mapping[str, tuple[int, ...]] | None
                         ) -> list[tuple[int, ...]]:
    """Combine declared input dims with user-given shapes into static shapes.

    Parameters
    ----------
    label : str
        The model, for messages.
    declared : sequence of (name, dims or None)
        Each input's declared dims (``None`` = unknown rank; a str or None dim is dynamic).
    given : mapping, optional
        User shapes by input name.

    Returns
    -------
    list of tuple of int
        One static shape per declared input.

    Raises
    ------
    SplitcError
        A given name that is not an input, a rank or static-size mismatch, or a dynamic
        dimension left unpinned (naming the input and the dimension).
    """
    given = dict(given or {})
    names = [n for n, _ in declared]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise SplitcError(f"{label}: no input named {', '.join(map(repr, unknown))}; "
                          f"the model's inputs are: {', '.join(names)}")
    return [_resolve_one(label, name, dims, given.get(name)) for name, dims in declared]


def _resolve_one(label: str, name: str, dims: Sequence[Dim] | None,
                 shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Static shape of one input (see :func:`resolve_input_shapes`)."""
    flag = f"--input-shape {name}={_example_dims(dims)}"
    if shape is None:
        if dims is None:
            raise SplitcError(f"{label}: input {name!r} has an unknown rank; give its shape: "
                              f"{flag} (Python: input_shapes={{{name!r}: (...)}})")
        dynamic = [f"{i} ({d!r})" if isinstance(d, str) else str(i)
                   for i, d in enumerate(dims) if not isinstance(d, int)]
        if dynamic:
            raise SplitcError(
                f"{label}: input {name!r} has dynamic dimension(s) {', '.join(dynamic)} "
                f"(shape {_fmt_dims(dims)}); pin them: {flag} (Python: "
                f"input_shapes={{{name!r}: (...)}})")
        return tuple(int(d) for d in dims)
    if dims is not None:
        if len(dims) != len(shape):
            raise SplitcError(f"{label}: input {name!r} has rank {len(dims)} (shape "
                              f"{_fmt_dims(dims)}), but the given shape {list(shape)} has rank "
                              f"{len(shape)}")
        for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(d, int) and d != s:
                raise SplitcError(f"{label}: input {name!r} dimension {i} is fixed at {d} "
                                  f"(shape {_fmt_dims(dims)}); the given shape {list(shape)} "
                                  f"says {s}")
    return shape


def _example_dims(dims: Sequence[Dim] | None) -> str:
    """``1,3,<height>,<width>``-style placeholder for a CLI hint."""
    if dims is None:
        return "D1,D2,..."
    return ",".join(str(d) if isinstance(d, int) else f"<{d or f'dim{i}'}>"
                    for i, d in enumerate(dims))


def _fmt_dims(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"




def normalise_shape_arg(shapes: Mapping[str, Sequence[int]] | None
                         ) -> dict[str, tuple[int, ...]] | None:
    """Validate the ``input_shapes`` argument: names to tuples of positive ints."""
    if not shapes:
        return None
    out = {}
    for name, dims in shapes.items():
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise SplitcError(f"input shape for {name!r} must be a sequence of integers, "
                              f"got {dims!r}") from None
        if any(d <= 0 for d in shape):
            raise SplitcError(f"input shape for {name!r} must have positive dims, "
                              f"got {list(shape)}")
        out[str(name)] = shape
    return out
