"""The command line as a new user meets it: the good path, and bad input -> one clear line,
exit code 2, no traceback."""

import subprocess
import sys

import numpy as np
import pytest


def splitc(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    r = splitc("compile", "resnet18", "--tiny", "-o", out, "--devices", "host,host",
               "--strategy", "pipeline")
    assert r.returncode == 0, r.stderr
    assert "2 devices" in r.stdout
    return out


def test_run_check_passes(compiled, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    r = splitc("run", compiled, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy",
               "--check")
    assert r.returncode == 0, r.stderr
    assert "check passed" in r.stdout and "bytes crossed" in r.stdout
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


def test_inspect_plan_and_model(compiled):
    r = splitc("inspect", compiled)
    assert r.returncode == 0 and "dev0 (host)" in r.stdout and "transfers:" in r.stdout
    r = splitc("inspect", "mlp", "--tiny")
    assert r.returncode == 0 and "matmul" in r.stdout and "GFLOPs" in r.stdout


def test_targets_and_zoo_list():
    assert "rpi4" in splitc("targets").stdout
    assert "resnet50" in splitc("zoo").stdout


def test_missing_model_file(tmp_path):
    assert_user_error(splitc("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o"),
                      "nope.onnx")


def test_garbage_model_file(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffnot a model at all" * 10)
    assert_user_error(splitc("compile", bad, "-o", tmp_path / "o"), "garbage.onnx")


def test_unknown_device(tmp_path):
    assert_user_error(splitc("compile", "mlp", "--tiny", "-o", tmp_path / "o", "--devices",
                             "host,toaster"), "toaster", "rpi4")


def test_unknown_strategy(tmp_path):
    assert_user_error(splitc("compile", "mlp", "--tiny", "-o", tmp_path / "o", "--strategy",
                             "magic"), "magic", "pipeline")


def test_shape_that_does_not_fit(tmp_path):
    assert_user_error(splitc("compile", "resnet18", "--tiny", "-o", tmp_path / "o",
                             "--input-shape", "input=1,3,32"), "input")
    assert_user_error(splitc("compile", "resnet18", "--tiny", "-o", tmp_path / "o",
                             "--input-shape", "input=1,3,a,b"), "--input-shape")


def test_run_without_a_plan(tmp_path):
    assert_user_error(splitc("run", tmp_path), "splitc compile")


def test_run_with_wrong_input_shape(compiled, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), "float32"))
    assert_user_error(splitc("run", compiled, "--input", tmp_path / "x.npy"), "shape")


def test_auto_compile_with_cluster_file_and_drawing(tmp_path):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[devices]]\ntarget = "host"\ncount = 2\ngflops = 5\n'
                       '[network]\nbandwidth = "1Gbit"\nlatency = "0.5ms"\n')
    r = splitc("plan", "resnet18", "--tiny", "--cluster", cluster, "--explain")
    assert r.returncode == 0, r.stderr
    assert "best:" in r.stdout and "candidate" in r.stdout and "why:" in r.stdout
    out = tmp_path / "auto"
    r = splitc("compile", "resnet18", "--tiny", "-o", out, "--cluster", cluster,
               "--strategy", "auto")
    assert r.returncode == 0, r.stderr
    assert "auto: chose" in r.stderr
    r = splitc("run", out, "--check")
    assert r.returncode == 0 and "check passed" in r.stdout, r.stdout + r.stderr
    r = splitc("inspect", out, "--draw", tmp_path / "plan.svg")
    assert r.returncode == 0, r.stderr
    svg = (tmp_path / "plan.svg").read_text()
    assert "<svg" in svg and "host0 (host)" in svg and "client" in svg


def test_missing_cluster_file(tmp_path):
    assert_user_error(splitc("plan", "mlp", "--tiny", "--cluster", tmp_path / "none.toml"),
                      "none.toml")
