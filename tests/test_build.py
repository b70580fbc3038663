"""The compiled twin is really in use: a build that silently fell back to pure
Python still passes every behaviour test, only slower, so check it here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sender.scheduler
import sender.smtp.wire
import sender.syncer

NO_EXTENSIONS = os.environ.get("SENDER_NO_EXTENSIONS") == "1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(NO_EXTENSIONS, reason="SENDER_NO_EXTENSIONS=1")
def test_c_loaded():
    assert sender.scheduler.COMPILED is True, (
        "sender._scheduler_c did not import; rebuild with: pip install -e . --no-build-isolation"
    )
    assert sender.scheduler.TimerHeap.__module__ == "sender._scheduler_c"
    assert sender.scheduler.TokenBucket.__module__ == "sender._scheduler_c"
    assert sender.syncer.COMPILED is True, "sender._syncer_c did not import"
    assert sender.syncer.serve.__module__ == "sender._syncer_c"
    assert sender.smtp.wire.COMPILED is True, "sender._wire_c did not import"
    assert sender.smtp.wire.parse_reply.__module__ == "sender._wire_c"


def test_no_extensions_env_forces_python():
    env = {**os.environ, "SENDER_NO_EXTENSIONS": "1"}
    code = ("import sender.scheduler as s, sender.syncer as y, sender.smtp.wire as w;"
            "print(s.COMPILED, s.TimerHeap.__module__, y.COMPILED, y.serve.__module__,"
            " w.COMPILED, w.parse_reply.__module__)")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "sender._scheduler_py", "False", "sender._syncer_py",
                                  "False", "sender._wire_py"]


def test_selector_exports_only_the_twin_api():
    assert sorted(sender.scheduler.__all__) == ["COMPILED", "Scheduler", "TimerHeap", "TokenBucket"]
