"""splitc: compile a model into per-device pieces and run them across a cluster."""

__version__ = "0.1.0"


def cache_root():
    """Where splitc keeps what it measured or exported once (device profiles, selected
    schedules, zoo exports): ``$SPLITC_CACHE``, else ``~/.cache/splitc``."""
    import os
    from pathlib import Path

    root = os.environ.get("SPLITC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "splitc"
