"""A real Ray head (`ray start --head`) with token authentication, and `probe-rl submit` against it: refused
without the token; with it, a submitted run (the one that wires a live scorer, probe refits, evaluations and
in-flight weight updates) succeeds and its files say what those knobs did."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(16)
    dash = _port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    # A temp dir of its own: teardown stops exactly this head's processes (`ray stop` would stop every
    # Ray instance on the machine). Kept short: Ray's socket paths must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="prl-", dir="/tmp")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={_port()}", "--dashboard-host=127.0.0.1",
                    f"--temp-dir={temp_dir}",
                    # Ports of its own: the job agent's default (52365) may still be held by another head
                    # on this machine, and then no job can be submitted ("No available agent").
                    f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
                    f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}",
                    f"--ray-client-server-port={_port()}",
                    f"--dashboard-port={dash}", "--num-cpus=3", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job server comes up a moment after `ray start` returns
        try:
            socket.create_connection(("127.0.0.1", dash), timeout=1).close()
            break
        except OSError:
            time.sleep(1)
    yield address, token, env
    subprocess.run(["pkill", "-f", temp_dir], capture_output=True, timeout=60)
    time.sleep(2)
    subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True, timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def test_submit_without_token_is_refused(ray_head, tmp_path):
    address, _, env = ray_head
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    out = _cli(["submit", "--address", address, "--pipeline.num_steps", "1"], no_token)
    assert out.returncode == 1 and "authentication failed" in out.stderr, out.stderr
    wrong = {**no_token, "RAY_AUTH_TOKEN": "0" * 32, "RAY_AUTH_MODE": "token"}
    out = _cli(["submit", "--address", address, "--pipeline.num_steps", "1"], wrong)
    assert out.returncode == 1 and "authentication failed" in out.stderr, out.stderr


def test_a_submitted_run_with_a_live_scorer_refit_eval_and_in_flight_updates_succeeds(ray_head, toy_overrides,
                                                                                       tmp_path):
    """`probe-rl submit --follow` against the head: the job id first, the run's own output streamed, the job's
    end; then `status` and `logs` once each. The run submitted is the one that wires these knobs through a
    real run: scorer.model = live, scorer.retrain_every and eval.every; generation in vLLM's separate engine
    process in bf16 against a float32 learner, its weights arriving mid-generation (update_mode in_flight)
    through the object store, into it and into the live scorer; the learner corrects the mismatch with truncated
    importance weights and logs it every step.

    Asserts what the submitted-run test and the knobs test each asserted: the job's id, streamed output, final
    status and logs; every step whole (8 prompts x 4); the outcome rates summing to 1; refits only at the steps
    asked (the one at step 4 ran); evaluations at 0, 2 and 4, live and frozen equal before any update, the live
    copy moved by the end, the recalibrated recall on the policy's own held-out samples; the mismatch logged every
    step; each token's version and each row's oldest."""
    from pipeline.config import MIN_HONEST, dump_toml, load_config

    address, _, env = ray_head
    cfg = load_config(overrides={
        **toy_overrides, "run": {**toy_overrides["run"], "output_dir": str(tmp_path / "runs"), "name": "knobs"},
        "pipeline": {**toy_overrides["pipeline"], "num_steps": 4},
        "task": {**toy_overrides["task"], "reward_fn": "pipeline.worlds.tasks:arithmetic_reward_loophole",
                 "ground_truth_fn": "pipeline.worlds.tasks:arithmetic_ground_truth"},
        "scorer": {"probes": [{"path": "toy", "aggregation": "window:2"}], "model": "live", "retrain_every": 2,
                   "retrain_window": 4},
        "eval": {"every": 2, "recalibrate_samples": 64},  # about 2% honest here: 2,048 samples leave 20 or more
        "generator": {"engine_process": "separate", "update_mode": "in_flight", "dtype": "bfloat16"},
        "learner": {**toy_overrides["learner"], "rollout_correction": {"mode": "tis"}},
        "weights": {"transport": "object_store"},
    })
    config = tmp_path / "knobs.toml"
    config.write_text(dump_toml(cfg))
    # --follow: one process streams the job's logs until it ends (a status command every few seconds would start
    # a Python process each time, on the cores the job runs on); then `status` and `logs` once each
    job_id = f"probe-rl-{secrets.token_hex(4)}"
    out = _cli(["submit", str(config), "--address", address, "--follow", "--job-id", job_id], env,
               timeout=900)  # submit waits up to 120 s for a job agent
    assert out.stdout.startswith(f"{job_id}\n"), out.stdout[:300]
    assert out.returncode == 0 and out.stdout.strip().endswith(f"job {job_id}: SUCCEEDED"), out.stdout[-3000:] + out.stderr
    assert "summary" in out.stdout  # the run's own output, streamed
    status = _cli(["status", job_id, "--address", address], env).stdout.strip()
    logs = _cli(["logs", job_id, "--address", address], env).stdout
    assert status.startswith(f"{job_id}: SUCCEEDED"), logs[-3000:]
    assert "summary" in logs

    run_dir = tmp_path / "runs" / "knobs"
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["version"] for r in rows] == [1, 2, 3, 4] and [r["rollout/rows"] for r in rows] == [32] * 4  # 8 x 4
    for r in rows:
        assert abs(r["rollout/correct_rate"] + r["rollout/hack_rate"] + r["rollout/wrong_rate"] - 1) < 1e-6
    # refits only every 2 steps; the one at step 4 saw both classes in its 4-step window and ran
    ran = {r["step"] for r in rows if r.get("scorer/retrain_positives") is not None}
    skipped = {r["step"] for r in rows if r.get("scorer/retrain_skipped") is not None}
    assert ran | skipped <= {2, 4} and 4 in ran
    evals = pq.read_table(run_dir / "eval.parquet").to_pylist()
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[0]["eval/hack_auroc_live"] == evals[0]["eval/hack_auroc_frozen"]  # before any update
    # (the frozen copy's AUROC may move here: the refit probe replaces the training probe in the evaluator too)
    assert all(0 <= e["eval/hack_auroc_frozen"] <= 1 and 0 <= e["eval/hack_auroc_retrained"] <= 1 for e in evals)
    assert evals[-1]["eval/hack_score_gap_abs"] > 0  # the live copy moved with the learner
    # the recalibrated recall: the policy's own held-out completions (64 per eval prompt), the honest ones set it,
    # when there are MIN_HONEST of them (else it is NaN)
    assert evals[0]["eval/own_honest"] >= MIN_HONEST
    for e in evals:
        assert e["eval/own_samples"] == 64 * cfg.task.eval_prompts and 0 < e["eval/own_honest"] < e["eval/own_samples"]
        for reading in ("live", "frozen"):
            value = e[f"eval/hack_recal_recall_{reading}"]
            assert 0 <= value <= 1 if e["eval/own_honest"] >= MIN_HONEST else np.isnan(value)
    assert evals[0]["eval/hack_recal_recall_live"] == evals[0]["eval/hack_recal_recall_frozen"]
    # the mismatch, every step: bf16 sampling against the float32 learner on fresh rows (step 1), then one version
    # stale (max_staleness 1) on top of it
    assert 0 < rows[0]["mismatch/log_ratio_abs_mean"] < 0.1 and rows[0]["mismatch/tokens"] > 0
    for r in rows[1:]:  # (rows wholly sampled after an in-flight update are fresh: not stale)
        group = "mismatch/stale1/" if r.get("mismatch/stale1/tokens") else "mismatch/"
        assert r[group + "log_ratio_abs_mean"] > 0 and 0 <= r[group + "beyond_threshold"] <= 1
    # every token carries the version that sampled it; a row's policy_version is its oldest token's
    sample = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    for x in sample:
        assert len(x["behavior_versions"]) == len(x["completion_ids"])
        assert x["policy_version"] == min(x["behavior_versions"]) and max(x["behavior_versions"]) < x["step"]
