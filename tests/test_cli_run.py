"""`splitc run` as a user runs it (a subprocess): a check that can be trusted, inputs in the
forms users have, and every failure exiting non-zero — 2 for bad input, 1 for a failed check
or a lost worker."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def splitc(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_exit(result, code, *words, stream="stderr"):
    text = getattr(result, stream)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in text, text


class FaintDetector(nn.Module):
    """A sigmoid map that is ~1e-6 everywhere on random inputs (as a detector's is)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(torch.relu(self.conv(x))) - 14.0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A model file compiled from its own folder, by a relative path, into another folder."""
    root = tmp_path_factory.mktemp("run")
    (root / "models").mkdir()
    torch.onnx.export(FaintDetector().eval(), (torch.zeros(1, 3, 16, 16),),
                      root / "models" / "faint.onnx", input_names=["image"],
                      output_names=["score"], dynamo=False)
    r = splitc("compile", "faint.onnx", "-o", "../out", "--devices", "host,host",
               cwd=root / "models")
    assert r.returncode == 0, r.stderr
    return root / "out"


def test_a_degenerate_reference_is_named_and_judged_by_the_absolute_tolerance(compiled):
    r = splitc("run", compiled, "--check")
    assert_exit(r, 0, "check passed", "nearly zero everywhere", stream="stdout")


def test_every_request_is_checked(compiled):
    r = splitc("run", compiled, "--check", "--requests", "3", "--inflight", "2")
    assert_exit(r, 0, "3 requests checked", stream="stdout")


def test_a_failed_check_exits_1(compiled):
    r = splitc("run", compiled, "--check", "--rtol", "0", "--atol", "0", "--requests", "2")
    assert_exit(r, 1, "check FAILED", "request 0, output score")


def test_the_model_is_found_from_another_folder_and_a_lost_one_is_named_first(compiled,
                                                                               tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_exit(splitc("run", compiled, "--check", cwd=elsewhere), 0, "check passed",
                stream="stdout")
    moved = tmp_path / "moved"
    shutil.copytree(compiled.parent, moved)  # model and plan moved together: still found
    (compiled.parent / "models" / "faint.onnx").rename(tmp_path / "faint.onnx")
    try:
        assert_exit(splitc("run", moved / "out", "--check"), 0, "check passed",
                    stream="stdout")
        r = splitc("run", compiled, "--check", cwd=elsewhere)
        assert_exit(r, 2, "faint.onnx", "gone")
        assert "ran " not in r.stdout  # refused before anything ran
    finally:
        (tmp_path / "faint.onnx").rename(compiled.parent / "models" / "faint.onnx")


def test_inputs_as_npz_by_name_and_as_an_image(compiled, tmp_path):
    from PIL import Image

    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype("float32")
    np.savez(tmp_path / "in.npz", image=x)
    assert_exit(splitc("run", compiled, "--input", tmp_path / "in.npz", "--check"), 0,
                "check passed", stream="stdout")
    np.savez(tmp_path / "wrong.npz", picture=x)
    assert_exit(splitc("run", compiled, "--input", tmp_path / "wrong.npz"), 2,
                "no array named 'image'", "picture")
    pixels = (np.random.default_rng(2).random((40, 30, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    r = splitc("run", compiled, "--input", tmp_path / "photo.png", "--mean",
               "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--output",
               tmp_path / "y.npy", "--check")
    assert_exit(r, 0, "check passed", stream="stdout")
    assert np.load(tmp_path / "y.npy").shape == (1, 1, 16, 16)
    assert_exit(splitc("run", compiled, "--input", tmp_path / "photo.png", "--mean", "1,2"),
                2, "--mean", "one per channel")


def test_a_text_file_named_npy_is_refused_by_what_it_is(compiled, tmp_path):
    (tmp_path / "x.npy").write_text("1 2 3\n")
    assert_exit(splitc("run", compiled, "--input", tmp_path / "x.npy"), 2,
                "not a .npy file", "magic")


def test_a_device_folder_is_not_a_plan_folder(compiled):
    assert_exit(splitc("run", compiled / "dev0"), 2, "one device's folder", str(compiled))


def test_a_lost_worker_exits_1(compiled):
    r = splitc("run", compiled, "--endpoints", "dev0=tcp://127.0.0.1:9,dev1=tcp://127.0.0.1:9",
               "--timeout", "2", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_serving_a_corrupt_folder_exits_2(compiled, tmp_path):
    bad = tmp_path / "dev0"
    shutil.copytree(compiled / "dev0", bad)
    (bad / "plan.json").write_text("{ not json")
    assert_exit(splitc("serve", bad, "--bind", "tcp://127.0.0.1:*", timeout=120), 2, "plan")


def test_an_empty_device_list_is_refused(tmp_path):
    assert_exit(splitc("compile", "mlp", "--tiny", "-o", tmp_path / "o", "--devices", ""), 2,
                "--devices")


def test_finetune_over_its_accuracy_limit_exits_1(tmp_path):
    out = tmp_path / "b"
    r = splitc("compile", "resnet18", "--tiny", "--strategy", "branch", "--devices",
               "host,host", "-o", out)
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x)
    r = splitc("finetune", out, "--data", tmp_path / "data.npz", "--epochs", "1",
               "--max-accuracy-drop", "-1")
    assert_exit(r, 1, "more than --max-accuracy-drop")
