"""Real ARM execution: an x86 worker and an aarch64 worker (qemu-user, in an arm64 root
filesystem holding only the board runtime) serve one plan, and the answer is the original's.

The armv7 board (no TVM wheel exists for it) runs TVM's C++ RPC server built for armhf by
``scripts/armhf-rpc.sh``, under qemu-arm.

Marker ``arm``; not in the default run. Build the root filesystem once with
``scripts/arm-rootfs.sh`` (root, a few minutes), then ``pytest -m arm``. Timings under
emulation mean nothing; only the answer is checked.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitc import frontend
from splitc.driver import compile_imported
from splitc.runtime.client import connect

pytestmark = pytest.mark.arm

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("SPLITC_ARM_ROOT", REPO / ".cache" / "arm64-root"))


@pytest.fixture(scope="module")
def rootfs():
    if not (ROOT / ".splitc-ready-v2").exists():
        pytest.skip(f"no arm64 root filesystem at {ROOT}: run scripts/arm-rootfs.sh")
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    mounts = []
    for src in ("/proc", "/dev"):
        target = ROOT / src.lstrip("/")
        if not os.path.ismount(target):
            subprocess.run(["mount", "--bind", src, str(target)], check=True)
            mounts.append(target)
    # the board-side package: splitc's runtime only (no compiler, no passes, no torch)
    pkg = ROOT / "opt" / "splitc" / "splitc"
    shutil.rmtree(pkg.parent, ignore_errors=True)
    (pkg / "runtime").mkdir(parents=True)
    for name in ("__init__.py", "errors.py"):
        shutil.copy(REPO / "splitc" / name, pkg / name)
    for f in (REPO / "runtime").glob("*.py"):
        shutil.copy(f, pkg / "runtime" / f.name)
    yield ROOT
    for target in reversed(mounts):
        subprocess.run(["umount", str(target)], check=False)


def test_x86_and_aarch64_workers_in_one_plan(rootfs, tmp_path):
    model = frontend.load("resnet18", tiny=True)
    out = tmp_path / "out"
    plan = compile_imported(model.mod, out, ["host", "rpi4"], "pipeline",
                            source={"model": "resnet18", "tiny": True, "input_shapes": {}})
    board = rootfs / "tmp" / "splitc-arm"
    shutil.rmtree(board, ignore_errors=True)
    shutil.copytree(out / "dev1", board / "dev1")
    endpoints = {"dev0": "tcp://127.0.0.1:5781", "dev1": "tcp://127.0.0.1:5782"}
    x86 = subprocess.Popen([sys.executable, "-m", "splitc.runtime.worker", str(out / "dev0"),
                            "--bind", endpoints["dev0"]], stderr=subprocess.PIPE)
    arm = subprocess.Popen(
        ["chroot", str(rootfs), "/usr/bin/env", "TVM_USE_RUNTIME_LIB=1",
         "PYTHONPATH=/opt/splitc", "/opt/venv/bin/python", "-m", "splitc.runtime.worker",
         "/tmp/splitc-arm/dev1", "--bind", endpoints["dev1"]], stderr=subprocess.PIPE)
    try:
        x = model.random_inputs(seed=3)
        deadline = time.time() + 300
        while True:  # the emulated worker takes a while to import numpy and TVM
            try:
                with connect(out, endpoints, start_timeout=60, timeout=120) as session:
                    (y,) = session.infer(*x)
                break
            except Exception:
                if time.time() > deadline or arm.poll() is not None:
                    raise
        (ref,) = model.reference(x)
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
        assert plan.devices[1].target == "rpi4"
        machine = subprocess.run(["chroot", str(rootfs), "/usr/bin/uname", "-m"],
                                 capture_output=True, text=True).stdout.strip()
        assert machine == "aarch64"
    finally:
        for p in (x86, arm):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(board, ignore_errors=True)


def tune_through_a_tracker(target: str, board, tmp_path: Path, *, trials: int = 0,
                           register_s: float = 300) -> None:
    """``splitc tune --target TARGET --trials TRIALS --rpc`` (the quick selection first, then
    MetaSchedule's trials) against a board that ``board(tracker)`` (its command line, given
    the tracker's HOST:PORT) serves to a TVM RPC tracker under the key ``target``: kernels
    cross-compiled here, sent through the tracker, loaded and timed on the emulated board,
    and the records stored for ``target``. Times under emulation mean nothing."""
    import tvm

    from splitc import targets
    from splitc.backend.tuning import Rpc, tune
    from splitc.passes.ir import lift_weights

    from .runtime_fixtures import two_in_two_out

    port = 9190 + os.getpid() % 500
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                                "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                               stderr=subprocess.DEVNULL)
    log = tmp_path / "board.log"  # (read on failure)
    server = subprocess.Popen(board(f"127.0.0.1:{port}"), stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    try:
        from tvm import rpc

        deadline = time.time() + register_s
        while True:  # an emulated board takes a while to start
            try:
                if target in rpc.connect_tracker("127.0.0.1", port).text_summary():
                    break
            except (RuntimeError, OSError):
                pass
            assert server.poll() is None, log.read_text()
            assert time.time() < deadline, f"the board did not register: {log.read_text()}"
            time.sleep(1)
        func, _ = lift_weights(two_in_two_out()["main"])
        db = tmp_path / "db"
        rows = tune(tvm.IRModule({"main": func}), targets.get(target), db, trials=trials,
                    rpc=Rpc("127.0.0.1", port, target, session_timeout=300), log=print)
        # the quick selection ran on the board: several candidates per conv kernel, and the
        # Winograd-or-direct choice, measured there
        assert rows and any(r["default_s"] for r in rows), rows
        assert any(r["candidates"] >= 2 for r in rows), rows
        assert (db / target / "database_tuning_record.json").read_text().strip()
        assert (db / target / "winograd.json").read_text().strip()
    finally:
        for p in (server, tracker):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_tuning_round_trip_through_rpc_to_an_emulated_board(rootfs, tmp_path):
    """`splitc tune --target rpi4 --trials 2 --rpc`: the board runs the runtime-only tune
    agent (Python, TVM's runtime library) in the arm64 root filesystem."""
    tune_through_a_tracker("rpi4", lambda tracker: [
        "chroot", str(rootfs), "/usr/bin/env", "PYTHONPATH=/opt/splitc",
        "/opt/venv/bin/python", "-m", "splitc.runtime.tune_agent", "--tracker", tracker,
        "--key", "rpi4", "--host", "127.0.0.1", "--port", "9600", "--port-end", "9700"],
        tmp_path, trials=2)


ARMHF_RPC = Path(os.environ.get("SPLITC_ARMHF_RPC", REPO / ".cache" / "armhf-rpc"))


def test_selection_through_rpc_to_an_emulated_armv7_board(tmp_path):
    """`splitc tune --target pynq-z1-arm --trials 0 --rpc`: no armv7 wheel of TVM exists, so
    the board serves through TVM's C++ RPC server (cross-compiled for armhf by
    scripts/armhf-rpc.sh), here under qemu-arm."""
    if not (ARMHF_RPC / ".splitc-ready-v1").exists():
        pytest.skip(f"no armhf TVM RPC server at {ARMHF_RPC}: run scripts/armhf-rpc.sh")
    qemu = shutil.which("qemu-arm-static") or shutil.which("qemu-arm")
    if qemu is None:
        pytest.skip("no qemu-arm (apt-get install qemu-user-static)")
    work = tmp_path / "board"
    work.mkdir()
    tune_through_a_tracker("pynq-z1-arm", lambda tracker: [
        "/usr/bin/env", f"LD_LIBRARY_PATH={ARMHF_RPC / 'lib'}", qemu, "-L",
        "/usr/arm-linux-gnueabihf", str(ARMHF_RPC / "bin" / "tvm_rpc"), "server",
        "--host=127.0.0.1", "--port=9700", "--port-end=9800", f"--tracker={tracker}",
        "--key=pynq-z1-arm", f"--work-dir={work}"], tmp_path, register_s=120)
