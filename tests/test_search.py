"""Cluster files, the cost model and the `auto` search."""

import dataclasses
import json
import os

import numpy as np
import pytest

from splitc import frontend
from splitc.errors import SplitcError
from splitc.planning import search as search_module
from splitc.planning.cluster import Cluster, ClusterDevice, Link, parse_rate, parse_time
from splitc.planning.cost import DeviceSpeed, estimate
from splitc.planning.speeds import cluster_speeds
from splitc.runtime.plan import Device, Endpoint, Piece, Plan, Tensor, Transfer


def test_cluster_file_units_and_links(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("""
[[devices]]
name = "pi"
target = "rpi4"
count = 2
memory = "512MiB"

[[devices]]
target = "host"
gflops = 20

[network]
bandwidth = "1Gbit"
latency = "0.5ms"

[[links]]
between = ["pi1", "host"]
bandwidth = "100Mbit/s"
latency = "2ms"
""")
    c = Cluster.load(path)
    assert [d.name for d in c.devices] == ["pi0", "pi1", "host"]
    assert c.devices[0].memory == 512 * 2**20 and c.devices[2].gflops == 20
    assert c.link("pi0", "pi1") == Link(125e6, 0.5e-3)
    assert c.link("host", "pi1") == Link(12.5e6, 2e-3)
    assert parse_rate("12.5MB/s") == 12.5e6 and parse_time("300us") == pytest.approx(3e-4)


@pytest.mark.parametrize("text, words", [
    ('[[devices]]\ntarget = "toaster"', ["toaster"]),
    ('[network]\nbandwidth = "1Gbit"', ["devices"]),
    ('[[devices]]\ntarget = "host"\n[network]\nbandwidth = "fast"', ["fast", "bandwidth"]),
    ("this is not toml", ["not valid"]),
])
def test_bad_cluster_files(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(SplitcError) as e:
        Cluster.load(path)
    for w in words:
        assert w in str(e.value)


def two_stage_plan():
    t = {"x": Tensor((1, 1000), "float32"), "a": Tensor((1, 250), "float32"),
         "y": Tensor((1, 10), "float32")}
    return Plan(
        strategy="pipeline",
        devices=(Device("dev0", "host", 0, "dev0"), Device("dev1", "host", 1, "dev1")),
        pieces=(Piece("dev0_p0", "dev0", ("x",), ("a",), 1, flops=2_000_000, weight_bytes=800),
                Piece("dev1_p0", "dev1", ("a",), ("y",), 1, flops=1_000_000, weight_bytes=400)),
        tensors=t, transfers=(Transfer("a", "dev0", "dev1", 1000),),
        inputs=(Endpoint("x", "x"),), outputs=(Endpoint("y", "y", "dev1"),))


def test_estimate_is_the_stated_formula():
    plan = two_stage_plan()
    link = Link(1e6, 1e-3)
    cluster = Cluster((ClusterDevice("a", "host", 1e9), ClusterDevice("b", "host", 1e9)), link)
    quiet = {"seconds_per_message": 0.0, "runtime_seconds_per_byte": 0.0}
    speeds = [DeviceSpeed(1e9, 1e-4, "test", **quiet), DeviceSpeed(0.5e9, 1e-4, "test", **quiet)]
    est = estimate(plan, cluster, speeds)
    send_x, send_a, send_y = link.seconds(4000), link.seconds(1000), link.seconds(40)
    run0, run1 = 2e6 / 1e9 + 1e-4, 1e6 / 0.5e9 + 1e-4
    assert est.latency == pytest.approx(send_x + run0 + send_a + run1 + send_y)
    assert est.period == pytest.approx(max(run0, run1, 1000 / 1e6))
    assert est.device_memory == {"dev0": 800 + 4000 + 1000, "dev1": 400 + 1000 + 40}
    # converting what crosses a piece's boundary costs per byte (x in, a out; a in, y out)
    per_byte = [dataclasses.replace(s, seconds_per_byte=1e-8) for s in speeds]
    slower = estimate(plan, cluster, per_byte)
    assert slower.latency - est.latency == pytest.approx(1e-8 * (4000 + 1000 + 1000 + 40))
    # every piece reads its weights once per call (800 and 400 bytes)
    reading = [dataclasses.replace(s, seconds_per_weight_byte=1e-7) for s in speeds]
    assert estimate(plan, cluster, reading).latency - est.latency == pytest.approx(1e-7 * 1200)
    # ... and the estimate says how much of each device's busy time that is
    assert estimate(plan, cluster, reading).device_weights == pytest.approx(
        {"dev0": 1e-7 * 800, "dev1": 1e-7 * 400})
    assert est.device_weights == {"dev0": 0.0, "dev1": 0.0}
    # a spatial split's pieces (tiles) cost more per FLOP, a pipeline's do not
    tiles = [dataclasses.replace(s, tile_seconds_per_flop=1e-10) for s in speeds]
    assert estimate(plan, cluster, tiles).latency == pytest.approx(est.latency)
    spatial = dataclasses.replace(plan, strategy="spatial")
    assert estimate(spatial, cluster, tiles).latency - est.latency == pytest.approx(
        1e-10 * (2_000_000 + 1_000_000))
    # a channel split's pieces cost more per byte in or out, a pipeline's or tiles' do not
    divided = [dataclasses.replace(s, channel_seconds_per_byte=1e-8) for s in speeds]
    assert estimate(plan, cluster, divided).latency == pytest.approx(est.latency)
    assert estimate(spatial, cluster, divided).latency == pytest.approx(est.latency)
    channel = dataclasses.replace(plan, strategy="channel")
    assert estimate(channel, cluster, divided).latency - est.latency == pytest.approx(
        1e-8 * (4000 + 1000 + 1000 + 40))
    # rates fitted to a split's pieces alone price that split's pieces instead (seconds per
    # FLOP, per weight byte, per byte in or out), and no other plan's
    fitted = [dataclasses.replace(s, tile_seconds_per_flop=1e-10, tile_rates=(3e-9, 1e-7, 1e-8),
                                  channel_rates=(4e-9, 0.0, 0.0)) for s in speeds]
    assert estimate(plan, cluster, fitted).latency == pytest.approx(est.latency)
    run0, run1 = (3e-9 * 2e6 + 1e-7 * 800 + 1e-8 * 5000 + 1e-4,
                  3e-9 * 1e6 + 1e-7 * 400 + 1e-8 * 1040 + 1e-4)
    assert estimate(spatial, cluster, fitted).latency == pytest.approx(
        send_x + run0 + send_a + run1 + send_y)
    assert estimate(spatial, cluster, fitted).device_weights == pytest.approx(
        {"dev0": 1e-7 * 800, "dev1": 1e-7 * 400})
    assert estimate(channel, cluster, fitted).latency == pytest.approx(
        send_x + 4e-9 * 3e6 + 2e-4 + send_a + send_y)
    # the runtime's serving thread handles every message, on the device that sends it and on
    # the one that receives it: x into dev0, a out of dev0 and into dev1, y out of dev1
    talking = [dataclasses.replace(s, seconds_per_message=1e-4, runtime_seconds_per_byte=1e-8)
               for s in speeds]
    slower = estimate(plan, cluster, talking)
    assert slower.latency - est.latency == pytest.approx(4e-4 + 1e-8 * (4000 + 2 * 1000 + 40))
    assert slower.device_busy["dev0"] - est.device_busy["dev0"] == pytest.approx(
        2e-4 + 1e-8 * (4000 + 1000))
    assert slower.device_busy["dev1"] - est.device_busy["dev1"] == pytest.approx(
        2e-4 + 1e-8 * (1000 + 40))
    # and spends some around every piece it runs (finding it ready, routing its outputs)
    dispatching = [dataclasses.replace(s, runtime_seconds_per_piece=3e-4) for s in speeds]
    slower = estimate(plan, cluster, dispatching)
    assert slower.latency - est.latency == pytest.approx(2 * 3e-4)
    assert slower.device_busy["dev0"] - est.device_busy["dev0"] == pytest.approx(3e-4)
    given = {"dev0_p0": 0.01, "dev1_p0": 0.02}  # (pieces priced by their kind pay it too)
    assert (estimate(plan, cluster, dispatching, piece_seconds=given).latency
            - estimate(plan, cluster, speeds, piece_seconds=given).latency) == pytest.approx(6e-4)


def test_messages_leaving_together_share_the_senders_link():
    """The caller sends each device its input at once: TCP gives the flows fair shares of its
    link, so a small message arrives when the link has carried it and as much of every other
    one (not first in line)."""
    t = {"x0": Tensor((1, 1000), "float32"), "x1": Tensor((1, 1500), "float32"),
         "a": Tensor((1, 250), "float32"), "b": Tensor((1, 250), "float32"),
         "y": Tensor((1, 10), "float32")}
    plan = Plan(
        strategy="spatial",
        devices=(Device("dev0", "host", 0, "dev0"), Device("dev1", "host", 1, "dev1")),
        pieces=(Piece("dev0_p0", "dev0", ("x0",), ("a", "b"), 1),
                Piece("dev1_p0", "dev1", ("x1",), (), 1),
                Piece("dev1_p1", "dev1", ("a", "b"), ("y",), 1)),
        tensors=t, transfers=(Transfer("a", "dev0", "dev1", 1000),
                              Transfer("b", "dev0", "dev1", 1000)),
        inputs=(Endpoint("x0", "x0"), Endpoint("x1", "x1")),
        outputs=(Endpoint("y", "y", "dev1"),))
    link = Link(1e6, 1e-3)
    cluster = Cluster((ClusterDevice("a", "host", 1e9), ClusterDevice("b", "host", 1e9)), link)
    speeds = [DeviceSpeed(1e9, 1e-4, "test", seconds_per_message=0.0,
                          runtime_seconds_per_byte=0.0)] * 2
    est = estimate(plan, cluster, speeds)
    x0 = 2 * 4000 / 1e6 + 1e-3  # 4 kB, while the link also carries 4 of x1's 6 kB
    x1 = 10000 / 1e6 + 1e-3
    ab = x0 + 1e-4 + 2000 / 1e6 + 1e-3  # a and b in one message
    assert ab > x1 + 1e-4  # (x0 first in line would have made dev1 wait for x1 instead)
    assert est.latency == pytest.approx(ab + 1e-4 + link.seconds(40))


def test_rates_fitted_to_whole_model_and_piece_timings():
    """seconds = FLOPs / rate + weight bytes x per-weight-byte + boundary bytes x per-byte,
    fitted to runs; a term the runs make negative is dropped, the rest fitted again."""
    from splitc.planning.profiler import fit_rates

    def seconds(flops, weights, edge):
        return flops / 2e11 + weights * 4e-11 + edge * 3e-10

    xs = [(8e9, 1e8, 6e5), (2e9, 0.9e8, 1.5e5), (1e9, 2e7, 2e6), (5e8, 4e7, 1e6)]
    rate, per_weight, per_byte = fit_rates([(x, seconds(*x)) for x in xs])
    assert (rate, per_weight, per_byte) == (pytest.approx(2e11), pytest.approx(4e-11),
                                            pytest.approx(3e-10))
    # runs exactly a quarter as long for a quarter of the FLOPs: no weight or boundary term
    flat = [((f, w, e), f / 2e11) for f, w, e in xs]
    assert fit_rates(flat) == pytest.approx((2e11, 0.0, 0.0), rel=1e-9, abs=1e-20)
    assert fit_rates(flat[:1]) == pytest.approx((2e11, 0.0, 0.0), rel=1e-9, abs=1e-20)
    # runs no three rates explain: the heavily weighted one is fitted closest
    odd = [(x, seconds(*x) * (1.0 if i % 2 else 1.3)) for i, x in enumerate(xs)]
    for heavy in (0, 1):
        r, pw, pb = fit_rates(odd, [100.0 if i == heavy else 1.0 for i in range(len(odd))])
        (f, w, e), t = odd[heavy]
        assert f / r + w * pw + e * pb == pytest.approx(t, rel=0.01)


def test_the_whole_model_is_priced_from_its_own_timings_however_many_pieces_beside_it():
    """The pieces of thin tiles run below the rates that time the whole model; as the tiles
    grew more (ResNet-50 for 16 devices: 550 pieces beside two whole-model timings), a fixed
    weight per timing let them outvote the whole model, priced 15 % over its own time."""
    from splitc.planning.profiler import fit_model_rates

    def whole_model(flops, weights, edge):
        return flops / 1.2e11 + weights * 2e-11 + edge * 2e-10

    wholes = [((8e9, 1e8, 6e5), whole_model(8e9, 1e8, 6e5)),
              ((2e9, 1e8, 1.5e5), whole_model(2e9, 1e8, 1.5e5))]
    rng = np.random.default_rng(0)
    for n in (10, 80, 600):  # pieces of thin tiles: 30-60 % slower than those rates
        pieces = []
        for _ in range(n):
            x = (rng.uniform(1e6, 5e8), rng.uniform(0, 1e7), rng.uniform(1e4, 1e6))
            pieces.append((x, whole_model(*x) * rng.uniform(1.3, 1.6)))
        rate, per_weight, per_byte = fit_model_rates(wholes + pieces, 2)
        for (f, w, e), t in wholes:
            assert f / rate + w * per_weight + e * per_byte == pytest.approx(t, rel=0.05), n


def search(mod, cluster, **options):
    """The search over ``cluster`` at its devices' speeds (profiled first where needed)."""
    return search_module.search(mod, cluster, cluster_speeds(cluster), **options)


@pytest.fixture(scope="module")
def resnet():
    return frontend.load("resnet18", tiny=True).mod


def two_hosts(link: Link, memory: float = 2**30) -> Cluster:
    """Two "host" devices that state their memory and speed (10 GFLOP/s: a cluster of "host"
    stating none would profile this machine first, 40 s)."""
    return Cluster(tuple(ClusterDevice(n, "host", memory, 10) for n in "ab"), link)


def test_memory_cap_forces_a_split(resnet):
    roomy = two_hosts(Link(125e6, 5e-4))
    first = search(resnet, roomy)
    weights = sum(p.weight_bytes for p in first.best.plan.pieces)
    cap = 0.75 * weights  # no single device holds all the weights
    tight = Cluster(tuple(ClusterDevice(d.name, d.target, cap, 10) for d in roomy.devices),
                    roomy.network)
    result = search(resnet, tight)
    assert len(result.best.plan.devices) == 2
    assert all(m <= cap for m in result.best.estimate.device_memory.values())
    assert any(not c.fits and c.label.startswith("single") for c in result.candidates)
    assert "over memory" in result.explain(tight)


def test_cluster_too_small_says_by_how_much(resnet):
    tiny = two_hosts(Link(125e6, 5e-4), memory=1000)
    with pytest.raises(SplitcError, match=r"cannot hold the model.*by [0-9.,]+ MiB"):
        search(resnet, tiny)


def test_slow_link_prefers_a_single_device(resnet):
    """On a very slow network nothing beats keeping every tensor at home."""
    slow = two_hosts(Link(1e5, 0.05))
    assert search(resnet, slow).best.label.startswith("single")


def test_plan_json_from_auto_round_trips(resnet):
    best = search(resnet, two_hosts(Link(125e6, 5e-4))).best
    assert Plan.from_dict(json.loads(best.plan.to_json())) == best.plan


def test_a_faster_device_gets_more_rows(resnet, monkeypatch):
    """Heterogeneous cluster: the spatial candidates divide rows in proportion to speed, so
    the slow devices are not the bottleneck (with equal rows they would be). (The runtime's
    cost per message, the same count on every device, is left out: on the tiny model it
    would outweigh the rows.)"""
    from splitc.passes.split.spatial import SpatialSplit, plan_spatial
    from splitc.planning import cost
    from splitc.planning.search import _candidate
    from splitc.planning.strategies import Proposal

    monkeypatch.setattr(cost, "DEFAULT_SECONDS_PER_MESSAGE", 0.0)
    monkeypatch.setattr(cost, "DEFAULT_RUNTIME_SECONDS_PER_BYTE", 0.0)

    cluster = Cluster((ClusterDevice("fast", "host", 2**30, 30), ClusterDevice("s1", "host",
                       2**30, 10), ClusterDevice("s2", "host", 2**30, 10)), Link(1e12, 1e-6))
    result = search(resnet, cluster)
    spatial = [c for c in result.candidates if c.strategy == "spatial"]
    assert spatial
    equal = _candidate(Proposal("equal rows", SpatialSplit(plan_spatial(resnet, 3))(resnet),
                                (0, 1, 2)), "spatial", cluster, result.speeds, "")
    for c in spatial:
        busy = c.estimate.device_busy
        assert busy["fast"] > 1.5 * max(busy["s1"], busy["s2"]) * 10 / 30
        assert max(busy.values()) < max(equal.estimate.device_busy.values())


def test_explicit_strategies_use_the_speeds_a_cluster_states(resnet, monkeypatch):
    """`--strategy spatial` (or pipeline) with a cluster that states speeds plans with them, as
    auto's candidates do: 3:1 speeds give the fast device about 3/4 of the rows. A cluster
    stating none splits evenly and measures nothing."""
    from splitc import driver
    from splitc.planning import strategies
    from splitc.planning.extract import extract

    def flops(cluster, strategy="spatial"):
        names = [d.name for d in cluster.devices]
        ctx = strategies.Context(2, driver.stated_speeds(cluster, print), cluster)
        ex = extract(strategies.get(strategy).split(resnet, ctx).module, names)
        return [sum(p.flops for p in ex.pieces if p.device == k) for k in names]

    stated = Cluster((ClusterDevice("a", "host", 2**30, 30), ClusterDevice("b", "host", 2**30,
                                                                           10)), Link(1e9, 1e-4))
    fast, slow = flops(stated)
    assert 2.2 < fast / slow < 5  # (the fast one, device 0, also runs the head)
    fast_stage, slow_stage = flops(stated, "pipeline")  # stages priced on the stated speeds

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("a cluster stating no speed was measured")

    monkeypatch.setattr(driver, "cluster_speeds", no_measuring)
    even = Cluster.uniform(["host", "host"])
    fast, slow = flops(even)
    assert 0.8 < fast / slow < 1.25
    first, second = flops(even, "pipeline")
    assert fast_stage / slow_stage > first / second  # the fast device's stage is the longer


def test_profile_table_gives_the_cost_model_its_speed(tmp_path, monkeypatch):
    """`splitc profile`'s table: FLOP/s, seconds per weight byte, call overhead and cost per
    boundary byte, stored where the cost model reads it for that target."""
    from splitc.planning import profiler
    from splitc.planning.cost import TILE_OVERHEAD, device_speed

    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path))
    table = profiler.measure("resnet18", "host", tiny=True, number=1)
    assert table["flops_per_second"] > 1e8 and table["call_overhead"] >= 0
    assert table["seconds_per_byte"] >= 0 and "per byte" in profiler.describe(table)
    assert table["seconds_per_weight_byte"] >= 0 and 0 <= table["fit_error"] < 1
    assert table["tile_seconds_per_flop"] >= 0
    assert "pieces of 2-way spatial splits" in table["fitted_on"]
    # and the rates fitted to those pieces alone, which price a spatial split's pieces
    assert len(table["tile_rates"]) == 3 and table["tile_rates"][0] > 0
    assert "a spatial split's pieces alone" in profiler.describe(table)
    # and one device's pieces of a channel split, which move many bytes per FLOP
    assert "pieces of a 2-way channel split" in table["fitted_on"]
    assert table["channel_seconds_per_byte"] >= 0
    assert "a channel split's pieces" in profiler.describe(table)
    assert f"fitted on {table['fitted_on']}" in profiler.describe(table)
    path = profiler.save(table)
    speed = device_speed(ClusterDevice("h", "host", 2**30))
    assert str(path) in speed.source
    assert (speed.flops_per_second, speed.seconds_per_byte, speed.seconds_per_weight_byte,
            speed.tile_seconds_per_flop, speed.channel_seconds_per_byte, speed.tile_rates,
            speed.channel_rates) == (
        table["flops_per_second"], table["seconds_per_byte"], table["seconds_per_weight_byte"],
        table["tile_seconds_per_flop"], table["channel_seconds_per_byte"],
        tuple(table["tile_rates"]), tuple(table["channel_rates"]))
    # a board's table is read as it is; one of the previous format is stale and ignored
    board = ClusterDevice("pi", "rpi4", 2**30)
    profiler.save({**table, "target": "rpi4"})
    assert device_speed(board).flops_per_second == table["flops_per_second"]
    profiler.save({**table, "target": "rpi4", "format": 1})
    assert device_speed(board).source.startswith("published peak")
    assert device_speed(board).seconds_per_weight_byte == pytest.approx(1 / 12.8e9)
    # without a profile, tiles cost TILE_OVERHEAD more per FLOP (measured here, assumed there)
    unprofiled = device_speed(board)
    assert unprofiled.tile_seconds_per_flop * unprofiled.flops_per_second == pytest.approx(
        TILE_OVERHEAD)
    given = device_speed(ClusterDevice("pi", "rpi4", 2**30, gflops=10.0))
    assert given.tile_seconds_per_flop == pytest.approx(TILE_OVERHEAD / 10e9)


def test_the_runtimes_cost_per_message_is_measured_and_priced(tmp_path, monkeypatch):
    """`splitc profile` measures what a message costs the runtime's serving thread (local
    workers' own counters); the cost model prices that, else the defaults."""
    from splitc.driver import measure_runtime_cost
    from splitc.planning import cost, profiler

    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path))
    measured = measure_runtime_cost("host", requests=10)
    assert 1e-6 < measured["seconds_per_message"] < 0.05
    assert 0 < measured["runtime_seconds_per_piece"] < 0.05
    assert "messages" in measured["runtime_measured_on"]
    table = {"target": "host", "model": "m", "codegen": cost.CODEGEN,
             "format": cost.PROFILE_FORMAT, "flops_per_second": 1e11, "call_overhead": 1e-5,
             "ops": {}}
    profiler.save(table)
    host = ClusterDevice("h", "host", 2**30)
    unmeasured = cost.device_speed(host)
    assert (unmeasured.seconds_per_message, unmeasured.runtime_seconds_per_byte,
            unmeasured.runtime_seconds_per_piece) == (
        cost.DEFAULT_SECONDS_PER_MESSAGE, cost.DEFAULT_RUNTIME_SECONDS_PER_BYTE,
        cost.DEFAULT_RUNTIME_SECONDS_PER_PIECE)
    assert "not measured" in profiler.describe(table)
    profiler.save({**table, **measured})
    speed = cost.device_speed(host)
    assert (speed.seconds_per_message, speed.runtime_seconds_per_byte,
            speed.runtime_seconds_per_piece) == (
        measured["seconds_per_message"], measured["runtime_seconds_per_byte"],
        measured["runtime_seconds_per_piece"])
    assert speed.message_seconds(1000) == pytest.approx(
        measured["seconds_per_message"] + 1000 * measured["runtime_seconds_per_byte"])
    assert "per message" in profiler.describe({**table, **measured})
    assert "per piece run" in profiler.describe({**table, **measured})
    slow = cost.device_speed(ClusterDevice("pi", "rpi4", 2**30, gflops=10.0))
    assert slow.seconds_per_message == cost.DEFAULT_SECONDS_PER_MESSAGE
    assert slow.tile_seconds_per_flop == pytest.approx(cost.TILE_OVERHEAD / 10e9)


def test_a_device_may_name_its_own_profile(tmp_path):
    """Two boards of one target at different speeds: each names the table measured on it
    (relative to the cluster file); a bad one is an error naming the device and the cause."""
    from splitc.passes.codegen.cpu_schedules import CODEGEN
    from splitc.planning.cost import PROFILE_FORMAT, device_speed

    table = {"target": "rpi4", "codegen": CODEGEN, "format": PROFILE_FORMAT,
             "flops_per_second": 6e9, "call_overhead": 1e-4, "seconds_per_byte": 2e-10,
             "seconds_per_weight_byte": 3e-10, "tile_seconds_per_flop": 1e-11}
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "fast.json").write_text(json.dumps(table))
    (tmp_path / "tables" / "slow.json").write_text(json.dumps(
        {**table, "flops_per_second": 3e9}))
    path = tmp_path / "c.toml"
    path.write_text("""
[[devices]]
name = "fast"
target = "rpi4"
profile = "tables/fast.json"
[[devices]]
name = "slow"
target = "rpi4"
profile = "tables/slow.json"
""")
    fast, slow = (device_speed(d) for d in Cluster.load(path).devices)
    assert (fast.flops_per_second, slow.flops_per_second) == (6e9, 3e9)
    assert fast.seconds_per_weight_byte == 3e-10 and "fast.json" in fast.source

    def error(entry: str, table_text: str | None = None) -> str:
        if table_text is not None:
            (tmp_path / "bad.json").write_text(table_text)
        path.write_text(f'[[devices]]\nname = "b"\ntarget = "rpi4"\n{entry}\n')
        with pytest.raises(SplitcError) as e:
            device_speed(Cluster.load(path).devices[0])
        return str(e.value)

    assert "does not exist" in error('profile = "nope.json"')
    assert "must be a file path" in error("profile = 3")
    assert "not both" in error('profile = "tables/fast.json"\ngflops = 3')
    assert "for 'host'" in error('profile = "bad.json"', json.dumps({**table, "target": "host"}))
    assert "measure it again" in error('profile = "bad.json"', json.dumps({**table, "format": 1}))
    assert "not a `splitc profile` table" in error('profile = "bad.json"', "[1, 2]")
    assert "cannot read" in error('profile = "bad.json"', "{")


def test_spatial_stages_are_priced_and_exact(resnet):
    """A mixed candidate: spatially split stages in a pipeline, each on its own device group,
    is priced by the search and gives the original's answer."""
    import numpy as np
    import tvm
    from tvm import relax

    from splitc.passes.split.spatial import SpatialSplit, plan_spatial_stages
    from splitc.targets import get

    cluster = Cluster(tuple(ClusterDevice(f"d{i}", "host", 2**30, 10) for i in range(4)),
                      Link(1e12, 1e-6))
    result = search(resnet, cluster, objective="throughput")
    [stages] = [c for c in result.candidates if c.label.startswith("spatial stages")]
    assert stages.label == "spatial stages [2+2]"
    plan = plan_spatial_stages(resnet, 4, 2)
    assert set(plan.groups) == {(0, 2), (2, 4)}
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    target = get("host").tvm_target()
    outs = []
    for mod in (resnet, SpatialSplit(plan)(resnet)):
        vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_splitc_profile_measures_the_runtime_too(tmp_path):
    """`splitc profile` as a user runs it: the table it writes prices the runtime's messages
    as measured on this machine, and it says so."""
    import subprocess
    import sys

    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, "-m", "splitc.cli", "profile", "--model", "resnet18",
                          "--tiny", "--output", str(out)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "SPLITC_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    table = json.loads(out.read_text())
    assert 0 < table["seconds_per_message"] < 0.05 and table["runtime_seconds_per_byte"] >= 0
    assert "of CPU per message" in run.stdout and f"wrote {out}" in run.stdout
