"""Test-wide settings: a private cache, so tests neither read nor leave state in ~/.cache;
and no schedule selection on compile (each of the suite's many tiny models would measure its
kernels' candidates: tests/test_selection.py turns it on where it is the subject)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    settings = {"SPLITC_CACHE": str(tmp_path_factory.mktemp("splitc-cache")),
                "SPLITC_SELECT": "0"}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
