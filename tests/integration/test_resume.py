"""A learner crash mid-run, then `probe-rl run --resume`: same step numbering, metrics appended, and the
resumed steps equal those of a run that never crashed (weights, Adam moments and LR schedule restored)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _args(toy_overrides, out_dir, name):
    toy, p = toy_overrides["toy"], toy_overrides["pipeline"]
    return ["run", "--toy.cache_dir", toy["cache_dir"], "--toy.sft_steps", str(toy["sft_steps"]),
            "--toy.probe_samples", str(toy["probe_samples"]), "--task.num_prompts", "256", "--task.eval_prompts", "8",
            "--pipeline.num_steps", "4", "--pipeline.prompts_per_step", str(p["prompts_per_step"]),
            "--pipeline.group_size", str(p["group_size"]), "--pipeline.max_staleness", "0",
            "--learner.micro_batch_size", "16", "--learner.checkpoint_every", "2", "--learner.lr", "1e-3",
            "--run.output_dir", str(out_dir), "--run.name", name, "--run.progress", "false"]


def _same(a: list[dict], b: list[dict]) -> bool:
    """Row equality where NaN equals NaN (a class absent from a batch has a NaN mean score)."""
    def norm(rows):
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]

    return norm(a) == norm(b)


def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_resume_after_learner_crash_matches_uninterrupted_run(toy_world, toy_overrides, tmp_path):
    full = _cli(_args(toy_overrides, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _cli(_args(toy_overrides, tmp_path, "crashed"), env={"PROBE_RL_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0 and "injected learner failure at step 3" in crashed.stderr
    run_dir = tmp_path / "crashed"
    before = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in before] == [1, 2]
    assert (run_dir / "checkpoints" / "step_000002" / "optimizer" / "optimizer.safetensors").is_file()

    resumed = _cli(["run", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["version"] for r in after] == [1, 2, 3, 4]
    assert _same(after[:2], before)  # appended, not overwritten
    reference = pq.read_table(tmp_path / "full" / "metrics.parquet").to_pylist()
    for got, want in zip(after[2:], reference[2:], strict=True):
        assert got["rollout/task_reward"] == want["rollout/task_reward"]
        assert got["learner/loss"] == pytest.approx(want["learner/loss"], rel=1e-3, abs=1e-6)
        assert got["learner/kl"] == pytest.approx(want["learner/kl"], rel=1e-3, abs=1e-7)
    steps = pq.read_table(run_dir / "rollouts.parquet").column("step").to_pylist()
    assert sorted(set(steps)) == [1, 2, 3, 4] and len(steps) == 4 * 16  # no step sampled twice


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "empty"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text("[pipeline]\nnum_steps = 2\n")
    out = _cli(["run", "--resume", str(run_dir)], timeout=120)
    assert out.returncode == 2 and "has no checkpoint to resume from" in out.stderr
