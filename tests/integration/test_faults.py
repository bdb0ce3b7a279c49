"""Workers killed mid-run: replaced, their chunks redone, nothing lost or counted twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_killed_scorer_and_generator_are_replaced(toy_world, toy_overrides, tmp_path):
    toy = toy_overrides["toy"]
    kills = f"scorer:2:{tmp_path / 'scorer.dead'},generator:4:{tmp_path / 'generator.dead'}"
    args = ["run", "--toy.cache_dir", toy["cache_dir"], "--toy.sft_steps", str(toy["sft_steps"]),
            "--toy.probe_samples", str(toy["probe_samples"]), "--task.num_prompts", "256", "--task.eval_prompts", "8",
            "--pipeline.num_steps", "5", "--pipeline.prompts_per_step", "8", "--pipeline.group_size", "4",
            "--pipeline.max_staleness", "0", "--learner.micro_batch_size", "16", "--run.output_dir", str(tmp_path),
            "--run.name", "faults", "--run.progress", "false"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=900,
                         cwd=ROOT, env={**os.environ, "PROBE_RL_KILL_ONCE": kills})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "scorer.dead").exists() and (tmp_path / "generator.dead").exists()  # both really died
    rows = pq.read_table(tmp_path / "faults" / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["rollout/rows"] for r in rows] == [32] * 5  # every step complete, nothing twice
    assert sum(r["pipeline/restarts"] for r in rows) == 2
    # max_staleness 0 is enforced: the replacement generator had the current weights before generating
    assert all(r["pipeline/staleness"] == 0 for r in rows)
    assert "generator 0 died; starting a replacement" in out.stdout
    assert "scorer 0 died; starting a replacement" in out.stdout
