"""Faults the way they happen, SIGKILL from outside, mid-run, and runs that carry on by themselves: a dead
generator or scorer is replaced with the current weights; a dead learner rank restarts every rank from the
newest checkpoint; a dead driver is resumed with `--resume`. In each case the finished run equals an
uninterrupted one, step for step."""

from __future__ import annotations

import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ._helpers import ROOT, Killer, cli, same_rows, same_weights

pytestmark = pytest.mark.integration


def test_killed_roles_and_driver_are_recovered_and_the_run_equals_an_uninterrupted_one(toy_world, toy_overrides,
                                                                                       reference_run, tmp_path):
    """The shared reference run's settings (bf16 learner, generators and scorers; two generators, two scorers, two
    learner ranks, the default max_staleness 1: generation a version ahead; ZeRO-0, a checkpoint every 2 steps;
    the probe refit every 3 steps). From outside, mid-run: a generator is SIGKILLed at step 2, a scorer at step
    3, one of the two learner ranks at step 4; each is recovered by the run itself (a replacement generator or
    scorer with the current weights and refit probe, which the step-for-step equality below checks: a
    replacement generating from other weights, or scoring with another probe, would change the rollouts; every
    learner rank restarted from the last checkpoint, fp32 masters, moments and refit probe included). At step 6 the driver process itself is
    SIGKILLed, and `probe-rl run --resume` finishes the run. Every step is whole, metric rows after each
    checkpoint are recomputed, never duplicated, TensorBoard and W&B hold each step once, the whole run equals
    the uninterrupted one step for step, and its final weights equal the uninterrupted run's bit for bit."""
    from .conftest import REFERENCE_STEPS, reference_args

    run_dir = reference_run.run_dir
    want = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    args = reference_args(toy_overrides, tmp_path, "crashed")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killer = Killer(tmp_path / "crashed" / "metrics.parquet",
                    [(2, "Generator"), (3, "Scorer"), (4, "Learner"), (6, driver.pid)], driver.pid)
    killer.start()
    log, _ = driver.communicate(timeout=900)
    killer.join(timeout=5)
    assert driver.returncode == -9, log[-3000:]  # it was killed, not finished
    assert [k[0] for k in killer.killed] == ["Generator", "Scorer", "Learner", driver.pid]
    assert all(at <= k[2] < REFERENCE_STEPS for at, k in zip((2, 3, 4, 6), killer.killed, strict=True))  # mid-run
    assert re.search(r"generator \d is down; starting a replacement \(weights version", log), log[-3000:]
    assert re.search(r"scorer \d is down; starting a replacement", log), log[-3000:]
    assert "learner restarted from" in log, log[-3000:]
    before = pq.read_table(tmp_path / "crashed" / "metrics.parquet").to_pylist()
    assert 6 <= len(before) < REFERENCE_STEPS
    assert max(r["pipeline/learner_restarts"] for r in before) >= 1
    resumed = cli(["run", "--resume", str(tmp_path / "crashed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = pq.read_table(tmp_path / "crashed" / "metrics.parquet").to_pylist()
    assert [r["rollout/rows"] for r in got] == [32] * REFERENCE_STEPS  # every step whole, nothing twice
    same_rows(got, want)
    steps = pq.read_table(tmp_path / "crashed" / "rollouts.parquet").column("step").to_pylist()
    assert sorted(set(steps)) == list(range(1, REFERENCE_STEPS + 1)) and len(steps) == REFERENCE_STEPS * 16
    assert any(r.get("scorer/retrain_auroc") is not None for r in got)  # the probe was refit on the way
    from pipeline.loop.loggers import read_tensorboard, read_wandb_offline

    tb = read_tensorboard(tmp_path / "crashed")
    assert [s for s, _ in tb["rollout/task_reward"]] == list(range(1, REFERENCE_STEPS + 1))  # each step once
    wb = [r["step"] for r in read_wandb_offline(tmp_path / "crashed") if "rollout/task_reward" in r]
    assert wb == list(range(1, REFERENCE_STEPS + 1))
    final = f"checkpoints/step_{REFERENCE_STEPS:06d}"
    same_weights(tmp_path / "crashed" / final, run_dir / final)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "empty"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text("[pipeline]\nnum_steps = 2\n")
    out = cli(["run", "--resume", str(run_dir)], timeout=120)
    assert out.returncode == 2 and "has no checkpoint to resume from" in out.stderr
