"""The strategy registry: a strategy registered here, in a test module, and nowhere else is
compiled, run exactly over ZeroMQ, offered to ``auto`` and listed where strategies are listed."""

import numpy as np
import pytest

from splitc import driver, frontend
from splitc.errors import SplitcError
from splitc.passes.ir import main_block
from splitc.passes.split.outline import OutlinePieces
from splitc.planning import strategies
from splitc.planning.cluster import Cluster, ClusterDevice, Link
from splitc.planning.cost import DeviceSpeed
from splitc.planning.search import search
from splitc.runtime.client import connect


class LastDevice(strategies.Strategy):
    """Everything on the last device: the others idle (a toy, not a good idea)."""

    name = "last"
    summary = "everything on the last device"

    def plan(self, mod, ctx):
        return ctx.n_devices - 1

    def rewrite(self, plan):
        def apply(mod):
            return OutlinePieces({b.var.name: plan for b in main_block(mod).bindings})(mod)
        return apply


@pytest.fixture
def last():
    strategies.register(LastDevice)
    yield strategies.get("last")
    strategies.unregister("last")


def test_a_registered_strategy_compiles_and_runs_exactly(last, tmp_path):
    out = tmp_path / "out"
    plan = driver.compile_model("mlp", out, ["host", "host", "host"], "last", tiny=True)
    assert plan.strategy == "last"
    assert {p.device for p in plan.pieces} == {"dev2"} and not plan.transfers
    model = frontend.load("mlp", tiny=True)
    x = model.random_inputs(seed=3)
    with connect(out) as session:
        [y] = session.infer(*x)
    [ref] = model.reference(x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # what `splitc tune OUT` and `run --check` ask the strategy
    assert set(driver.device_modules(out)) == {"host"}
    assert driver.load_reference(out).reference(x)[0].shape == y.shape


def test_a_registered_strategy_is_offered_to_auto(last):
    mod = frontend.load("mlp", tiny=True).mod
    cluster = Cluster(tuple(ClusterDevice(f"d{i}", "host", 2**30, 10) for i in range(2)),
                      Link(125e6, 5e-4))
    speeds = [DeviceSpeed(1e10, 1e-4, "test")] * 2
    result = search(mod, cluster, speeds)
    [offered] = [c for c in result.candidates if c.strategy == "last"]
    assert offered.label == "last over all"
    assert "last over all" in result.explain(cluster)


def test_strategies_are_listed_from_the_registry(last):
    assert "last" in driver.strategy_names() and "auto" in driver.strategy_names()
    assert "last (everything on the last device)" in strategies.describe()
    strategies.unregister("last")
    with pytest.raises(SplitcError, match="unknown strategy 'last'; choose one of .*pipeline"):
        driver.check_request(Cluster.uniform(["host"]), "last")


def test_too_few_devices_for_a_strategy_is_refused_before_any_work():
    with pytest.raises(SplitcError, match="branch strategy needs at least 2 devices"):
        driver.check_request(Cluster.uniform(["host"]), "branch")
