"""Faults the way they happen, SIGKILL from outside, mid-run, and runs that carry on by themselves: a dead
generator or scorer is replaced with the current weights; a dead learner rank restarts every rank from the
newest checkpoint; a dead driver is resumed with `--resume`. In each case the finished run equals an
uninterrupted one, step for step."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ._helpers import ROOT, Killer, cli, same_rows, toy_args

pytestmark = pytest.mark.integration
STEPS = 8


def _run(toy_overrides, tmp_path, name, extra, plan=()):
    """A run of its own (own Ray instance), with SIGKILLs along `plan`; (result, killer, metric rows)."""
    killer = Killer(tmp_path / name / "metrics.parquet", list(plan))
    killer.start()
    out = cli(toy_args(toy_overrides, tmp_path, name, STEPS) + extra)
    killer.join(timeout=5)
    rows = pq.read_table(tmp_path / name / "metrics.parquet").to_pylist()
    return out, killer, rows


def test_killed_generator_scorer_and_learner_rank_are_recovered_exactly(toy_world, toy_overrides, tmp_path):
    """max_staleness 0, ZeRO-2: a generator, a scorer and the learner rank are SIGKILLed at steps 2, 3 and 5.
    The generator and scorer are replaced (a replacement generator holds the current weights before it
    generates, or the staleness check would fail the run); the learner restarts from its last checkpoint.
    Every step is whole, and the run equals an uninterrupted one."""
    extra = ["--pipeline.max_staleness", "0", "--learner.zero_stage", "2", "--learner.checkpoint_every", "2"]
    ref, _, want = _run(toy_overrides, tmp_path, "reference", extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, killer, got = _run(toy_overrides, tmp_path, "faults", extra,
                            [(2, "Generator"), (3, "Scorer"), (5, "Learner")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert [k[0] for k in killer.killed] == ["Generator", "Scorer", "Learner"]
    assert all(k[2] < STEPS for k in killer.killed)  # each died mid-run
    assert [r["rollout/rows"] for r in got] == [32] * STEPS  # every step whole, nothing twice
    same_rows(got, want)
    assert "generator 0 is down; starting a replacement (weights version" in out.stdout
    assert "scorer 0 is down; starting a replacement" in out.stdout
    assert "learner restarted from" in out.stdout, out.stdout[-3000:]
    assert max(r["pipeline/learner_restarts"] for r in got) >= 1


def test_learner_kill_then_driver_kill_and_resume_equal_an_uninterrupted_run(toy_world, toy_overrides, reference_run,
                                                                            tmp_path):
    """The shared reference run's settings (the default max_staleness 1, generation a version ahead; ZeRO-0): the
    learner rank is SIGKILLed at step 3 and recovers by itself; at step 6 the driver process itself is
    SIGKILLed, and `probe-rl run --resume` finishes the run. Metric rows after each checkpoint are recomputed,
    never duplicated, and the whole run equals the uninterrupted one."""
    from .conftest import REFERENCE_STEPS, reference_args

    run_dir, _ = reference_run
    want = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    args = reference_args(toy_overrides, tmp_path, "crashed")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killer = Killer(tmp_path / "crashed" / "metrics.parquet", [(3, "Learner"), (6, driver.pid)])
    killer.start()
    log, _ = driver.communicate(timeout=900)
    killer.join(timeout=5)
    assert driver.returncode == -9, log[-3000:]  # it was killed, not finished
    assert [k[0] for k in killer.killed] == ["Learner", driver.pid]
    assert "learner restarted from" in log
    before = pq.read_table(tmp_path / "crashed" / "metrics.parquet").to_pylist()
    assert 6 <= len(before) < REFERENCE_STEPS
    resumed = cli(["run", "--resume", str(tmp_path / "crashed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = pq.read_table(tmp_path / "crashed" / "metrics.parquet").to_pylist()
    same_rows(got, want)
    steps = pq.read_table(tmp_path / "crashed" / "rollouts.parquet").column("step").to_pylist()
    assert sorted(set(steps)) == list(range(1, REFERENCE_STEPS + 1)) and len(steps) == REFERENCE_STEPS * 16


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "empty"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text("[pipeline]\nnum_steps = 2\n")
    out = cli(["run", "--resume", str(run_dir)], timeout=120)
    assert out.returncode == 2 and "has no checkpoint to resume from" in out.stderr
