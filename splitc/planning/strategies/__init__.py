"""The strategy table with the built-in strategies in it: each is registered by its own module
here (see :mod:`splitc.planning.registry`). Read the table through this package, so that the
built-in ones are always there."""

from splitc.planning.registry import (
    Context,
    Proposal,
    Split,
    Strategy,
    all_strategies,
    describe,
    get,
    names,
    register,
    unregister,
)
from splitc.planning.strategies import branch, channel, hybrid, pipeline, spatial

__all__ = ["Context", "Proposal", "Split", "Strategy", "all_strategies", "branch", "channel",
           "describe", "get", "hybrid", "names", "pipeline", "register", "spatial", "unregister"]
