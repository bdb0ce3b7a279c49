"""A generator whose vLLM engine died under a call ends its process, so that the fleet sees a dead generator and
replaces it, rather than handing the driver an error it would stop the run for; any other error is returned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from actors.generator import WORKER_DIED, _dies_with_its_engine

class Engine:
    def _engine_dead(self):
        return WORKER_DIED if {dead} else ""

    @_dies_with_its_engine
    def generate(self, n):
        raise RuntimeError("Executor failed.")

try:
    Engine().generate(3)
except RuntimeError as e:
    print("returned:", e)
"""


@pytest.mark.parametrize("dead", [True, False])
def test_a_call_that_fails_with_a_dead_engine_ends_the_process(dead):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(dead=dead)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    if dead:
        assert out.returncode == 1 and out.stdout == "", out.stderr[-2000:]
        assert "a vLLM worker process of this generator died; exiting so that it is replaced" in out.stderr
    else:
        assert out.returncode == 0 and out.stdout == "returned: Executor failed.\n", out.stderr[-2000:]
