"""Scorer scaling by backlog, in a run of its own (a local Ray instance that reserves CPUs for the maximum):
scoring made slow grows the scorers to the maximum without the run waiting for any of them to start;
made fast again, they shrink back to the minimum."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ._helpers import toy_args

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_scorers_grow_under_backlog_and_shrink_when_idle(toy_world, toy_overrides, tmp_path):
    switch = tmp_path / "slow"
    switch.touch()
    metrics = tmp_path / "scale" / "metrics.parquet"

    def speed_up_at_the_maximum():  # scoring turns fast again once three scorers serve
        deadline = time.monotonic() + 600
        while switch.exists() and time.monotonic() < deadline:
            try:
                if max(pq.read_table(metrics).column("scorer/workers").to_pylist()) >= 3:
                    switch.unlink()
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=speed_up_at_the_maximum, daemon=True)
    watcher.start()
    args = toy_args(toy_overrides, tmp_path, "scale", 34) + [
        "--scorer.num_workers", "1", "--scorer.max_workers", "3", "--scorer.num_cpus", "0.25",
        "--scorer.scale_down_steps", "2", "--scorer.scale_up_wait", "0.1", "--pipeline.prompts_per_step", "12"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True, timeout=900,
                         cwd=ROOT, env={**os.environ, "PROBE_RL_SLOW": f"scorer:1.0:{switch}"})
    watcher.join(timeout=5)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = pq.read_table(metrics).to_pylist()
    workers = [int(r["scorer/workers"]) for r in rows]
    assert len(rows) == 34 and all(r["rollout/rows"] == 48 for r in rows)  # every step whole
    peak = workers.index(3)
    assert workers[:peak] == sorted(workers[:peak]) and workers[0] == 1  # grew one at a time to the maximum
    assert workers[-1] == 1 and min(workers[peak:]) == 1  # and back to the minimum once scoring was fast
    # steps finished while a scorer was still starting: the run did not wait for it
    assert any(r["scorer/joining"] == 1.0 for r in rows[:peak])
    assert "starting scorer 1" in out.stdout and "scorer 2 joined" in out.stdout
    assert "retiring scorer 2 once it drains" in out.stdout
