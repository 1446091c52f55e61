"""Test-wide settings: a private cache, so tests neither read nor leave state in ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    old = os.environ.get("SPLITC_CACHE")
    os.environ["SPLITC_CACHE"] = str(tmp_path_factory.mktemp("splitc-cache"))
    yield
    if old is None:
        os.environ.pop("SPLITC_CACHE", None)
    else:
        os.environ["SPLITC_CACHE"] = old
