"""Workers killed from outside (SIGKILL) mid-run: replaced, given the current weights, their chunks redone,
nothing lost or counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def ray_worker_pids(actor_class: str) -> list[int]:
    """PIDs of the Ray worker processes that run an actor of this class (Ray titles them `ray::<Class>...`)."""
    out = subprocess.run(["pgrep", "-f", f"^ray::{actor_class}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def steps_done(metrics: Path) -> int:
    try:
        return len(pq.read_table(metrics).column("step"))
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0


class Killer(threading.Thread):
    """Sends SIGKILL to each named actor's process once the run has logged the given number of steps."""

    def __init__(self, metrics: Path, plan: list[tuple[int, str]], deadline_s: float = 900) -> None:
        super().__init__(daemon=True)
        self.metrics, self.plan, self.deadline = metrics, list(plan), time.monotonic() + deadline_s
        self.killed: list[tuple[str, int, int]] = []  # (class, pid, steps logged when killed)

    def run(self) -> None:
        while self.plan and time.monotonic() < self.deadline:
            done = steps_done(self.metrics)
            at, cls = self.plan[0]
            pids = ray_worker_pids(cls)
            if done >= at and pids:
                os.kill(pids[0], signal.SIGKILL)
                self.killed.append((cls, pids[0], done))
                self.plan.pop(0)
            time.sleep(0.05)


def toy_args(toy_overrides, out_dir: Path, name: str, steps: int) -> list[str]:
    toy = toy_overrides["toy"]
    return ["run", "--toy.cache_dir", toy["cache_dir"], "--toy.sft_steps", str(toy["sft_steps"]),
            "--toy.probe_samples", str(toy["probe_samples"]), "--task.num_prompts", "256", "--task.eval_prompts", "8",
            "--pipeline.num_steps", str(steps), "--pipeline.prompts_per_step", "8", "--pipeline.group_size", "4",
            "--learner.micro_batch_size", "16", "--run.output_dir", str(out_dir), "--run.name", name,
            "--run.progress", "false"]


def test_killed_generator_and_scorer_are_replaced_with_current_weights(toy_world, toy_overrides, tmp_path):
    steps = 12
    # max_staleness 0: a replacement generator that generated before holding the current weights would fail
    # the run's staleness check, so a complete run shows that every replacement caught up first.
    args = toy_args(toy_overrides, tmp_path, "faults", steps) + ["--pipeline.max_staleness", "0"]
    killer = Killer(tmp_path / "faults" / "metrics.parquet", [(2, "Generator"), (5, "Scorer")])
    killer.start()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    killer.join(timeout=5)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [k[0] for k in killer.killed] == ["Generator", "Scorer"]  # both were killed mid-run
    assert all(k[2] < steps for k in killer.killed)
    rows = pq.read_table(tmp_path / "faults" / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    assert [r["rollout/rows"] for r in rows] == [32] * steps  # every step complete, nothing twice
    assert all(r["pipeline/staleness"] == 0 for r in rows)
    assert "generator 0 is down; starting a replacement (weights version" in out.stdout
    assert "scorer 0 is down; starting a replacement" in out.stdout
