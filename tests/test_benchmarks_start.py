"""Every benchmark starts: its imports resolve against today's modules (a benchmark is run
by hand, so a renamed module would otherwise break it unnoticed — hostile.py did)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")
                                          if "__main__" in p.read_text()))
def test_benchmark_starts(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=BENCHMARKS,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
