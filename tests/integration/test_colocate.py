"""Colocated roles (pipeline.colocate): generation, scoring and the learner step take turns, each on every core of
the machine, and the run equals the disaggregated synchronous run of the same seed step for step, also when its
learner and its generator are SIGKILLed from outside mid-run."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.cores import node_cores

from ._helpers import ROOT, Killer, cli, same_rows, same_weights, toy_args

pytestmark = pytest.mark.integration

STEPS = 6


def test_a_colocated_run_takes_every_core_by_phase_and_equals_the_synchronous_run_through_kills(toy_world,
                                                                                               toy_overrides, tmp_path):
    """Two runs of the toy world at max_staleness 0 (a checkpoint every 2 steps): disaggregated, each role on the
    threads Ray reserves for it (1 each); colocated, whose generator is SIGKILLed at step 2 and whose learner at
    step 4. The colocated run's roles computed on every core of the machine in each phase (its metrics' thread
    counts), each step once, and its rows and final weights equal the disaggregated run's."""
    common = ["--pipeline.max_staleness", "0", "--learner.checkpoint_every", "2", "--eval.every", "0"]
    plain = cli(toy_args(toy_overrides, tmp_path, "disaggregated", STEPS) + common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    args = toy_args(toy_overrides, tmp_path, "colocated", STEPS) + common + ["--pipeline.colocate", "true"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killer = Killer(tmp_path / "colocated" / "metrics.parquet", [(2, "Generator"), (4, "Learner")], driver.pid)
    killer.start()
    log, _ = driver.communicate(timeout=900)
    killer.join(timeout=5)
    assert driver.returncode == 0, log[-3000:]
    assert [k[0] for k in killer.killed] == ["Generator", "Learner"], killer.report()
    assert "learner restarted from" in log and "generator 0 is down; starting a replacement" in log, log[-3000:]
    want = pq.read_table(tmp_path / "disaggregated" / "metrics.parquet").to_pylist()
    got = pq.read_table(tmp_path / "colocated" / "metrics.parquet").to_pylist()
    assert [r["rollout/rows"] for r in got] == [32] * STEPS  # every step whole, nothing twice
    same_rows(got, want)
    # the generator handed the engine over around every learner step (vLLM's level-0 sleep, then a wake after the
    # weights): the hand-overs' seconds are in every row
    assert all(r["colocate/sleep_s"] > 0 and r["colocate/wake_s"] > 0 for r in got), got
    assert all("colocate/sleep_s" not in r for r in want)
    cores = node_cores()
    assert all(r[f"cores/{role}_threads"] == 1 for r in want for role in ("generate", "score", "learn"))
    # Phases take turns: each role found the others idle (up to the odd moment a replacement was starting)
    for role in ("generate", "score", "learn"):
        assert sorted(r[f"cores/{role}_threads"] for r in got)[STEPS // 2] == cores, (role, got)
    final = f"checkpoints/step_{STEPS:06d}"
    same_weights(tmp_path / "colocated" / final, tmp_path / "disaggregated" / final)
