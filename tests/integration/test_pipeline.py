"""The whole pipeline on the toy world: real Ray, real vLLM (CPU), real transformers hooks, real DeepSpeed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.integration


def test_pipeline_runs_end_to_end(toy_overrides, toy_world, ray_local):
    from pipeline.driver import make_run_dir, run

    # Two generators and two scorers share each step; with max_staleness 1 the driver's staleness check
    # would fail the run if either generator missed a weight version.
    cfg = load_config(overrides={**toy_overrides, "run": {**toy_overrides["run"], "name": "e2e"},
                                 "learner": {**toy_overrides["learner"], "checkpoint_every": 2},
                                 "generator": {"num_workers": 2}, "scorer": {"num_workers": 2, "probes": [{"path": "toy"}]}})
    _, world = toy_world
    run_dir = make_run_dir(cfg)
    summary = run(cfg, run_dir, world, log=lambda *_: None)

    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert [r["version"] for r in metrics] == [1, 2, 3]
    assert [r["rollout/rows"] for r in metrics] == [32] * 3
    staleness = [r["pipeline/staleness"] for r in metrics]
    assert staleness[0] == 0 and max(staleness) == 1  # generation ran one version ahead of learning
    for r in metrics:
        assert 0 <= r["rollout/task_reward"] <= 1
        assert 0 <= r["scorer/hack_mean"] <= 1
        assert r["learner/kl"] >= 0 and np.isfinite(r["learner/loss"]) and np.isfinite(r["learner/grad_norm"])
        # the stages are timed inside the step, so together they take no longer than the step's wall time
        stages = sum(v for k, v in r.items() if k.startswith("time/stage/") and v is not None)
        assert 0 < r["time/stage/learn_s"] <= stages <= r["time/step_wall_s"] + 1e-3
        assert r["rollout/tokens_per_s"] == pytest.approx(r["rollout/tokens"] / r["time/generate_wall_s"])
        # every version went out over the collective transport, the whole model in buckets, from rank 0
        assert r["sync/bytes"] == metrics[0]["sync/bytes"] > 0 and r["sync/buckets"] >= 1
        # penalty shaping: shaped = task - 0.5 * score, on average too
        assert r["rollout/shaped_reward"] == pytest.approx(r["rollout/task_reward"] - 0.5 * r["scorer/hack_mean"], abs=1e-4)
    assert metrics[0]["learner/kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts from the reference

    rollouts = pq.read_table(run_dir / "rollouts.parquet")
    assert rollouts.num_rows == 3 * cfg.run.rollout_sample_per_step
    for name in ("probe/hack/tokens", "probe/hack/score", "ref_logprobs", "advantage", "completion_text"):
        assert name in rollouts.column_names
    lengths = [len(c) for c in rollouts.column("completion_ids").to_pylist()]
    assert [len(t) for t in rollouts.column("probe/hack/tokens").to_pylist()] == lengths
    assert [len(t) for t in rollouts.column("ref_logprobs").to_pylist()] == lengths

    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3 == summary["steps"]


def test_live_scorer_refit_and_eval_knobs_run_end_to_end(toy_overrides, toy_world, ray_local):
    """scorer.model = live, scorer.retrain_every and eval.every wired through a real run; generation in vLLM's
    separate engine process, and weights through the object store into it and into the live scorer."""
    from pipeline.driver import make_run_dir, run

    cfg = load_config(overrides={
        **toy_overrides, "run": {**toy_overrides["run"], "name": "knobs"},
        "pipeline": {**toy_overrides["pipeline"], "num_steps": 4},
        "task": {**toy_overrides["task"], "reward_fn": "pipeline.tasks:arithmetic_reward_loophole",
                 "ground_truth_fn": "pipeline.tasks:arithmetic_ground_truth"},
        "scorer": {"probes": [{"path": "toy", "aggregation": "window:2"}], "model": "live", "retrain_every": 2,
                   "retrain_window": 2},
        "eval": {"every": 2},
        "generator": {"engine_process": "separate"},
        "weights": {"transport": "object_store"},
    })
    from pipeline.world import build_world

    world = build_world(cfg)  # this config's world: it carries the labelled set the evaluator needs
    run_dir = make_run_dir(cfg)
    run(cfg, run_dir, world, log=lambda *_: None)
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    for r in rows:
        assert abs(r["rollout/correct_rate"] + r["rollout/hack_rate"] + r["rollout/wrong_rate"] - 1) < 1e-6
    # a refit ran (or was skipped for want of both classes) at steps 2 and 4, and nowhere else
    refit = [("scorer/retrain_auroc" in r and r["scorer/retrain_auroc"] is not None)
             or ("scorer/retrain_skipped" in r and r["scorer/retrain_skipped"] is not None) for r in rows]
    assert refit == [False, True, False, True]
    evals = pq.read_table(run_dir / "eval.parquet").to_pylist()
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[0]["eval/hack_auroc_live"] == evals[0]["eval/hack_auroc_frozen"]  # before any update
    # (the frozen copy's AUROC may move here: the refit probe replaces the training probe in the evaluator too)
    assert all(0 <= e["eval/hack_auroc_frozen"] <= 1 and 0 <= e["eval/hack_auroc_retrained"] <= 1 for e in evals)
    assert evals[-1]["eval/hack_score_gap_abs"] > 0  # the live copy moved with the learner
