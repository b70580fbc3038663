import importlib
import os

import pytest


@pytest.fixture(params=["c", "py"])
def sched(request):
    """The compiled and the pure-Python scheduler twin, so every test runs on both.

    "c" is skipped only when SENDER_NO_EXTENSIONS=1; otherwise a missing build fails loudly.
    """
    if request.param == "c" and os.environ.get("SENDER_NO_EXTENSIONS") == "1":
        pytest.skip("SENDER_NO_EXTENSIONS=1")
    return importlib.import_module(f"sender._scheduler_{request.param}")


@pytest.fixture(params=["c", "py"])
def wire_twin(request):
    """The compiled and the pure-Python wire twin (reply parser, dot-stuffing)."""
    if request.param == "c" and os.environ.get("SENDER_NO_EXTENSIONS") == "1":
        pytest.skip("SENDER_NO_EXTENSIONS=1")
    return importlib.import_module(f"sender._wire_{request.param}")
