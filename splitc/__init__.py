"""splitc: compile a model into per-device pieces and run them across a cluster."""

__version__ = "0.1.0"
