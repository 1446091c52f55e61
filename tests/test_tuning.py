"""Tuning databases: default schedules kept as records, reuse across models, same answers."""

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc import targets
from splitc.backend.build import build
from splitc.backend.tuning import tune
from splitc.backend.tuning_db import database_for, target_key
from splitc.errors import SplitcError

from .test_cpu_schedules import conv_module

HOST = targets.get("host")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A database tuned (4 MetaSchedule trials) on a conv + bias + ReLU model."""
    root = tmp_path_factory.mktemp("db")
    rows = tune(conv_module(16, 16, 8, 3, 1, 1), HOST, root, trials=4, log=lambda _m: None)
    return root, rows


def test_default_schedule_is_a_record(db):
    """Every kernel's default schedule was measured and stored: the best record is never
    slower than it, however few trials ran."""
    _, rows = db
    assert rows and all(r["default_s"] is not None for r in rows)
    assert all(r["best_s"] <= r["default_s"] for r in rows)


def test_compile_with_database_gives_same_answer(db):
    root, _ = db
    folder = database_for(HOST, root)
    assert folder == root / target_key(HOST)
    log = []
    # Another model holding the same conv kernel (different first layer): records match by
    # kernel structure, not by model.
    mod = conv_module(16, 16, 8, 3, 1, 1)
    rng = np.random.default_rng(5)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in mod["main"].params]
    answers = []
    for tuning_db in (folder, None):
        ex, _ = build(mod, HOST.tvm_target(), tuning_db=tuning_db, log=log.append)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        answers.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-5)
    assert "1 from tuning records" in log[0], log


def test_database_without_records_for_target_is_refused(tmp_path):
    with pytest.raises(SplitcError, match="no tuning records for target rpi4"):
        database_for(targets.get("rpi4"), tmp_path)


def test_tuning_a_board_target_here_is_refused(tmp_path):
    with pytest.raises(SplitcError, match=r"does not run here: give --rpc TRACKER_HOST:PORT "
                                          r"--key KEY.*splitc tune-agent"):
        tune(conv_module(8, 8, 4, 3, 1, 1), targets.get("rpi4"), tmp_path, trials=0)
    with pytest.raises(SplitcError, match="FPGA fabric: hls4ml builds its pieces"):
        tune(conv_module(8, 8, 4, 3, 1, 1), targets.get("pynq-z1-fpga"), tmp_path, trials=0)


def test_cli_tunes_the_pieces_of_a_compiled_plan(tmp_path):
    """`splitc tune OUT`: the pieces of OUT's devices of the target, each kernel once."""
    from .test_cli import assert_user_error, splitc

    out = tmp_path / "out"
    r = splitc("compile", "mlp", "--tiny", "-o", out, "--devices", "host,host,host",
               "--strategy", "channel")
    assert r.returncode == 0, r.stderr
    r = splitc("tune", out, "--db", tmp_path / "db", "--trials", "0")
    assert r.returncode == 0, r.stderr
    # three devices hold the same channel slices' kernels: each distinct one is measured once
    (line,) = [m for m in r.stderr.splitlines() if "distinct kernels for host" in m]
    distinct = int(line.split()[0])
    assert 0 < distinct < 3 * 3, line
    assert_user_error(splitc("tune", out, "--db", tmp_path / "db", "--target", "rpi4"),
                      "no device of target rpi4")
    assert_user_error(splitc("tune", "mlp", "--tiny", "--db", tmp_path / "db", "--target",
                             "rpi4", "--rpc", "nocolon"), "HOST:PORT")


def test_cli_tune_then_compile_uses_records(tmp_path):
    from .test_cli import assert_user_error, splitc

    r = splitc("tune", "mlp", "--tiny", "--db", tmp_path / "db", "--trials", "0")
    assert r.returncode == 0, r.stderr
    assert "fused_matmul" in r.stdout and "wrote" in r.stdout
    r = splitc("compile", "mlp", "--tiny", "-o", tmp_path / "out", "--devices", "host",
               "--tuning-db", tmp_path / "db")
    assert r.returncode == 0, r.stderr
    assert "from tuning records" in r.stderr
    assert_user_error(splitc("tune", "mlp", "--tiny", "--db", tmp_path, "--trials", "-1"),
                      "--trials")
    assert_user_error(splitc("compile", "mlp", "--tiny", "-o", tmp_path / "o2",
                             "--tuning-db", tmp_path / "empty"), "no tuning records")


def test_winograd_kernels_keep_their_selected_record(tmp_path):
    """A model whose only heavy kernel is a Winograd convolution: its selected schedule (the
    fastest default-schedule candidate) is stored as its record and the search skips it
    (MetaSchedule's rules cannot unroll the transforms), so the database holds it and nothing
    slower."""
    from .test_winograd import conv_model

    mod = conv_model(64, 64, 32, (1, 1, 1, 1))
    messages = []
    rows = tune(mod, HOST, tmp_path, trials=8, log=messages.append)
    winograd = [r for r in rows if "winograd" in r["kernel"]]
    assert winograd and all(r["best_s"] == r["selected_s"] <= r["default_s"]
                            for r in winograd), rows
    assert any("Winograd kernels keep their selected schedule" in m for m in messages), messages
