"""The whole pipeline on the toy world: real Ray, real vLLM (CPU), real transformers hooks, real DeepSpeed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.integration


@pytest.mark.smoke
def test_pipeline_runs_end_to_end(reference_run):
    """The shared reference run (two generators, two scorers, two learner ranks, max_staleness 1, penalty shaping,
    checkpoints every 2 steps), read back from its files."""
    from pipeline.worlds.tasks import arithmetic_reward

    from .conftest import REFERENCE_STEPS as steps

    run_dir = reference_run.run_dir
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))
    assert [r["version"] for r in metrics] == list(range(1, steps + 1))
    assert [r["rollout/rows"] for r in metrics] == [32] * steps
    # generation ran one version ahead of learning: step 1 from version 0, step s from version s - 2 after that
    assert [r["pipeline/staleness"] for r in metrics] == [0] + [1] * (steps - 1)
    rollouts = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    for r in metrics:
        sample = [x for x in rollouts if x["step"] == r["step"]]
        assert {x["policy_version"] for x in sample} == {max(0, r["step"] - 2)}  # the staleness logged is real
        # the stages are timed inside the step, so together they take no longer than the step's wall time
        stages = sum(v for k, v in r.items() if k.startswith("time/stage/") and v is not None)
        assert 0 < r["time/stage/learn_s"] <= stages <= r["time/step_wall_s"] + 1e-3
        assert r["rollout/tokens_per_s"] == pytest.approx(r["rollout/tokens"] / r["time/generate_wall_s"])
        # every version went out over the collective transport, the whole model in buckets, from rank 0
        assert r["sync/bytes"] == metrics[0]["sync/bytes"] > 0 and r["sync/buckets"] >= 1
        # penalty shaping: shaped = task - 0.5 * score, on average too
        assert r["rollout/shaped_reward"] == pytest.approx(r["rollout/task_reward"] - 0.5 * r["scorer/hack_mean"], abs=1e-4)
    # the probe read inside the generators' sampling pass (`hack@gen`) beside the frozen copy's: on the rows
    # of version 0 the two readings are of the same weights (bf16 in vLLM's kernels and in transformers'), so
    # the decomposition's representation term is ~0; later it is what training did to the representation
    for r in metrics:
        o = {k.split("/")[-1]: v for k, v in r.items() if k.startswith("obfuscation/hack@gen/")}
        assert o["representation"] == pytest.approx(o["live"] - o["frozen"])
        assert o["total"] == pytest.approx(o["representation"] + o["behaviour"])
        if r["step"] <= 2:
            assert abs(o["representation"]) < 0.01
    assert metrics[0]["obfuscation/hack@gen/behaviour"] == 0.0  # the first step is the baseline
    assert metrics[0]["learner/kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts from the reference
    assert all(r["learner/kl"] > 0 for r in metrics[1:])  # and the policy moves away from it

    assert len(rollouts) == steps * 16
    for x in rollouts:  # each sampled row's columns agree with one another
        assert x["task_reward"] == arithmetic_reward([x["completion_text"]], [x["answer"]])[0]
        assert x["shaped_reward"] == pytest.approx(x["task_reward"] - 0.5 * x["probe/hack/score"], abs=1e-6)
        assert len(x["probe/hack/tokens"]) == len(x["ref_logprobs"]) == len(x["completion_ids"])
        assert x["probe/hack/score"] == pytest.approx(np.mean(x["probe/hack/tokens"]), abs=1e-6)  # mean-pooled
        # the generator reading covers completion tokens 0..T-2 (the last is never fed back), mean-pooled too
        assert len(x["probe/hack@gen/tokens"]) == len(x["completion_ids"]) - 1
        if len(x["completion_ids"]) > 1:
            assert x["probe/hack@gen/score"] == pytest.approx(np.mean(x["probe/hack@gen/tokens"]), abs=1e-6)
        if x["policy_version"] == 0:  # the same weights as the frozen copy: the same scores, to bf16 kernels
            assert np.allclose(x["probe/hack@gen/tokens"], x["probe/hack/tokens"][:-1], atol=0.06)

    # checkpoints every 2 steps, the newest 3 kept, each beside the rollouts launched before it
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_000004", "step_000006", "step_000008"]
    for name in kept:
        assert (run_dir / "checkpoints" / name / "model.safetensors").is_file()
        assert (run_dir / "checkpoints" / f"{name}.inflight.parquet").is_file()
    inflight = pq.read_table(run_dir / "checkpoints" / "step_000006.inflight.parquet")
    assert sorted(set(inflight.column("inflight_step").to_pylist())) == [7, 8]  # launched before it, versions <= 6
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps

    # run.loggers: TensorBoard and W&B (offline) hold the same numbers as metrics.parquet, step by step
    from pipeline.loop.loggers import read_tensorboard, read_wandb_offline

    tb, wb = read_tensorboard(run_dir), read_wandb_offline(run_dir)
    wb_steps = {r["step"]: r for r in wb if "rollout/task_reward" in r}
    for key in ("rollout/task_reward", "learner/kl", "time/step_wall_s"):
        assert tb[key] == [(r["step"], pytest.approx(r[key])) for r in metrics]
        assert [(s, wb_steps[s][key]) for s in sorted(wb_steps)] == [(r["step"], pytest.approx(r[key])) for r in metrics]


def test_profile_on_a_tiny_world_reports_what_its_runs_measured(toy_overrides, toy_world, tmp_path):
    """`probe-rl profile --live`, one repeat with KL on the toy world: plain, probes on the frozen scorers, on a live
    scorer, and on the generators; each arm's figures in profile.md are the means of its own run's metrics after
    warm-up, and the overheads are their ratios."""
    from pipeline.analysis.profile import _summarise

    from ._helpers import cli, toy_args

    out_dir = tmp_path / "profile"
    args = toy_args(toy_overrides, tmp_path, "unused", 3)[1:]  # profile names each arm's run itself
    done = cli(["profile", "--repeats", "1", "--kl", "on", "--live", "--out", str(out_dir), *args])
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out_dir / "profile.md").read_text()
    base = load_config(None, args)
    summary = {}
    for arm in ("plain-kl", "probes-kl", "live-kl", "gen-kl"):
        rows = pq.read_table(out_dir / f"{arm}-r0" / "metrics.parquet").to_pylist()
        assert len(rows) == 3
        m = summary[arm] = _summarise(rows[2:], base)  # warm-up: the first two steps; both arms hold the same
        assert m["step_s"] == pytest.approx(np.mean([r["time/step_wall_s"] for r in rows[2:]]))
        assert m["busy_total"] > 0 and m["held_total"] > m["busy_total"] * 0.1
        assert f"| {arm} | {m['step_s']:.3f} | {m['generate_s']:.3f} | {m['score_s']:.3f} |" in text
        assert f"| {m['busy_total']:.2f} | {m['held_total']:.2f} |" in text
    wall = summary["probes-kl"]["step_s"] / summary["plain-kl"]["step_s"]
    busy = summary["probes-kl"]["busy_total"] / summary["plain-kl"]["busy_total"]
    assert f"wall time **{wall:.3f}**" in text and f"busy resource-seconds **{busy:.3f}**" in text
    assert (out_dir / "timeline-probes-kl.json").is_file()
    for arm in ("probes", "live", "gen"):  # the live-reading table: generator and scorer busy seconds against plain
        gen = summary[f"{arm}-kl"]["busy_generator"] / summary["plain-kl"]["busy_generator"]
        score = summary[f"{arm}-kl"]["busy_scorer"] / summary["plain-kl"]["busy_scorer"]
        assert f"| {arm}-kl | **{gen:.3f}** ({gen:.3f}-{gen:.3f}) | **{score:.3f}** ({score:.3f}-{score:.3f}) |" in text
    gen_rows = pq.read_table(out_dir / "gen-kl-r0" / "rollouts.parquet")
    assert "probe/hack/tokens" in gen_rows.column_names  # the gen arm's probe was read on the generators
    assert [len(t) for t in gen_rows.column("probe/hack/tokens").to_pylist()] == \
        [len(c) - 1 for c in gen_rows.column("completion_ids").to_pylist()]
    # Again into the same folder: both runs are complete there, so they are read back (no run, no Ray) and the
    # report is the same; with another config the folder is refused rather than mixed.
    again = cli(["profile", "--repeats", "1", "--kl", "on", "--live", "--out", str(out_dir), *args])
    assert again.returncode == 0 and "4 of 4 runs are complete" in again.stdout, again.stderr[-3000:]
    assert (out_dir / "profile.md").read_text() == text
    other = cli(["profile", "--repeats", "1", "--kl", "on", "--out", str(out_dir), *args, "--learner.lr", "1e-3"])
    assert other.returncode == 2 and "holds a run of another config" in other.stderr


def test_experiment_on_a_tiny_world_wires_probe_loss_and_ablation_and_reports_its_runs(toy_overrides, toy_world,
                                                                                       tmp_path):
    """`probe-rl experiment` with the probe_loss, ablate and random_direction arms of configs/experiment_full.toml,
    one world, 2 steps each: the knobs act (the learner's own probe score is logged for probe_loss only; under
    ablation the first step's ratios are unclipped and the learner's pass is edited; the random-direction control is
    read beside the probe and is what the penalty subtracts; so is the text-only monitor's score, equal to a monitor
    refitted here on the probe's labelled set), and the report's numbers are those of the runs' data/."""
    from ._helpers import cli, toy_args

    out_dir = tmp_path / "exp"
    args = [a for a in toy_args(toy_overrides, tmp_path, "unused", 2)[1:]]
    args = [a for i, a in enumerate(args) if a not in ("--run.name", "--run.output_dir")
            and args[i - 1] not in ("--run.name", "--run.output_dir")]
    done = cli(["experiment", "--file", "configs/experiment_full.toml", "--arms", "probe_loss", "ablate",
                "random_direction", "text_monitor", "--seeds", "0", "--out", str(out_dir), *args, "--eval.every", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out_dir / "report.md").read_text()
    for arm in ("probe_loss", "ablate"):
        metrics = pq.read_table(out_dir / "data" / f"{arm}-seed0.metrics.parquet").to_pylist()
        evals = pq.read_table(out_dir / "data" / f"{arm}-seed0.eval.parquet").to_pylist()
        assert [r["step"] for r in metrics] == [1, 2] and [e["step"] for e in evals] == [0, 2]
        hack = [r["rollout/hack_rate"] for r in metrics]  # 2 steps: the start and end windows are all of them
        correct = [r["rollout/correct_rate"] for r in metrics]
        assert (f"| {arm} | 1 | {np.mean(hack):.3f} → {np.mean(hack):.3f} | {np.mean(correct):.3f} → "
                f"{np.mean(correct):.3f} |") in report
        e0, e1 = evals
        assert (f"| {arm} | {e0['eval/hack_auroc_live']:.3f} → {e1['eval/hack_auroc_live']:.3f} | "
                f"{e1['eval/hack_auroc_frozen']:.3f} | {e1['eval/hack_auroc_retrained']:.3f} |") in report
        assert e0["eval/hack_auroc_live"] == e0["eval/hack_auroc_frozen"]  # before any update: the same model
        probe_scores = [r["learner/probe_score"] for r in metrics]
        if arm == "probe_loss":
            assert all(0 < s < 1 for s in probe_scores)  # the mean probe score on the learner's own pass
        else:
            assert all(np.isnan(s) for s in probe_scores)
            # step 1: the learner's edited pass departs from the unedited frozen reference (KL > 0, where a plain
            # run's first KL is 0), while its ratio to vLLM's equally edited sampling stays unclipped
            assert metrics[0]["learner/kl"] > 1e-7 and metrics[0]["learner/clip_frac"] == 0.0
    assert "| 2. probe score in the loss, differentiated through | probe_loss |" in report
    # the control: a random direction read beside the probe, and the penalty (coef 1) is its score, not the probe's
    metrics = pq.read_table(out_dir / "data" / "random_direction-seed0.metrics.parquet").to_pylist()
    assert all(0 < r["scorer/hack_random_mean"] < 1 and r["scorer/hack_random_mean"] != r["scorer/hack_mean"]
               for r in metrics)
    rows = pq.read_table(out_dir / "random_direction-seed0" / "rollouts.parquet").to_pylist()
    assert rows and all(abs(r["shaped_reward"] - (r["task_reward"] - r["probe/hack_random/score"])) < 1e-5
                        for r in rows)
    # the text-only control: what the penalty subtracts is the text monitor's score of the completion's tokens
    from pipeline.worlds.toy import toy_labelled
    from probes.text import fit_text_monitor

    cfg, world = toy_world
    reference, _ = fit_text_monitor(toy_labelled(cfg.toy.probe_samples // 2, cfg.toy.max_operand, seed=cfg.toy.seed + 4,
                                                 cfg=cfg.toy), world.tokenizer, "hack_text", seed=cfg.toy.seed)
    rows = pq.read_table(out_dir / "text_monitor-seed0" / "rollouts.parquet").to_pylist()
    text = reference.scores([r["completion_ids"] for r in rows])
    assert rows and np.allclose([r["task_reward"] - r["shaped_reward"] for r in rows], text, atol=1e-5)
    assert len(set(np.round(text, 4))) > 1  # it tells completions apart
    summary = json.loads((out_dir / "text_monitor-seed0" / "summary.json").read_text())
    assert summary["text_monitor_held_out_auroc"] == reference.notes["held_out"]["auroc"]
    assert 0.5 < summary["probe_held_out_auroc"] <= 1.0
    assert (f"| 0 | {summary['probe_held_out_auroc']:.3f} | {summary['text_monitor_held_out_auroc']:.3f} | "
            f"{summary['probe_held_out_auroc'] - summary['text_monitor_held_out_auroc']:+.3f} |") in report
    metrics = pq.read_table(out_dir / "data" / "text_monitor-seed0.metrics.parquet").to_pylist()
    assert all(0 < r["scorer/text_mean"] < 1 for r in metrics)
