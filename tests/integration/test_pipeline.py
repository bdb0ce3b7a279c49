"""The whole pipeline on the toy world: real Ray, real vLLM (CPU), real transformers hooks, real DeepSpeed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
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
        assert r["rollout/tokens"] > 0 and r["time/learn_s"] > 0 and r["time/step_s"] > 0
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


def _train_batch(rollouts: pa.Table, rng: np.random.Generator) -> pa.Table:
    from pipeline.schema import NONFINITE, REF_LOGPROBS, REWARD_FIELDS, train_schema
    from pipeline.shaping import group_advantages

    reward = rng.integers(0, 2, rollouts.num_rows).astype(np.float32)
    adv = group_advantages(reward, rollouts.column("group_id").to_numpy())
    table = rollouts.append_column(REF_LOGPROBS, rollouts.column("behavior_logprobs"))
    table = table.append_column(NONFINITE, pa.array([False] * table.num_rows))
    for f, v in zip(REWARD_FIELDS, (reward, reward, np.ones(len(reward), bool), adv), strict=True):
        table = table.append_column(f, pa.array(v, f.type))
    assert table.schema.equals(train_schema([]))
    return table


def test_weight_sync_generator_matches_learner_greedy(toy_world, ray_local, tmp_path):
    """After a sync, vLLM's greedy completions equal transformers `generate` on the learner's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from learner.learner import Learner
    from pipeline.config import GeneratorConfig, LearnerConfig
    from pipeline.remote import free_port, make_actor, wait

    cfg, world = toy_world
    prompts = world.prompts_for_step(1, 8, 0)
    gen = make_actor(Generator, "generator", 1, 0, None, world.model_path, GeneratorConfig(max_new_tokens=8))
    lcfg = LearnerConfig(lr=3e-2, kl_coef=0.0, micro_batch_size=32)
    learner = make_actor(Learner, "learner", 0.5, 0, None, world.model_path, lcfg, 32, 0, 1, "127.0.0.1", free_port())
    before = wait(gen.greedy.remote(world.eval_prompt_ids, 8), "generator", 300)
    rng = np.random.default_rng(0)
    for _ in range(3):
        rollouts, _stats = wait(gen.generate.remote(prompts.slice(0, 8), 4, 0), "generator", 300)
        wait(learner.train_step.remote(_train_batch(rollouts, rng)), "learner", 300)
    wire = wait(learner.get_weights.remote(), "learner", 300)
    assert wire.version == 3
    assert wait(gen.update_weights.remote(wire, wire.version), "generator", 300) == 3
    after = wait(gen.greedy.remote(world.eval_prompt_ids, 8), "generator", 300)

    ckpt = wait(learner.save_checkpoint.remote(str(tmp_path)), "learner", 300)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    from pipeline.weights import from_wire

    state = from_wire(wire)
    for name, tensor in model.state_dict().items():  # the checkpoint is what was published
        if name in state:
            assert torch.equal(tensor, state[name]), name
    expected = []
    with torch.no_grad():
        for ids in world.eval_prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    assert after == expected
    assert after != before, "training changed nothing: the test would not notice a missed update"
    with pytest.raises(ValueError, match="refusing older version"):
        wait(gen.update_weights.remote(wire, 1), "generator", 300)
    ray_local.kill(gen)
    ray_local.kill(learner)


def test_scorers_scale_up_when_scoring_lags(toy_overrides, toy_world, ray_local):
    from pipeline.driver import make_run_dir, run

    # One sequence per scorer forward pass makes scoring slower than generation: the backlog grows.
    cfg = load_config(overrides={**toy_overrides, "run": {**toy_overrides["run"], "name": "scale"},
                                 "pipeline": {**toy_overrides["pipeline"], "num_steps": 4},
                                 "scorer": {"probes": [{"path": "toy"}], "batch_size": 1, "max_workers": 2}})
    _, world = toy_world
    run_dir = make_run_dir(cfg)
    messages = []
    run(cfg, run_dir, world, log=messages.append)
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert rows[0]["scorer/lag"] > 1
    assert [r["scorer/workers"] for r in rows][:2] == [2, 2]  # scaled up after step 1, never past the maximum
    assert any("scorers 1 -> 2" in m for m in messages)
    assert [r["rollout/rows"] for r in rows] == [32] * 4


def test_live_scorer_refit_and_eval_knobs_run_end_to_end(toy_overrides, toy_world, ray_local):
    """scorer.model = live, scorer.retrain_every and eval.every wired through a real run."""
    from pipeline.driver import make_run_dir, run

    cfg = load_config(overrides={
        **toy_overrides, "run": {**toy_overrides["run"], "name": "knobs"},
        "pipeline": {**toy_overrides["pipeline"], "num_steps": 4},
        "task": {**toy_overrides["task"], "reward_fn": "pipeline.tasks:arithmetic_reward_loophole",
                 "ground_truth_fn": "pipeline.tasks:arithmetic_ground_truth"},
        "scorer": {"probes": [{"path": "toy", "aggregation": "window:2"}], "model": "live", "retrain_every": 2,
                   "retrain_window": 2},
        "eval": {"every": 2},
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
