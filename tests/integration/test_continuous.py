"""Continuous generation (generator.update_mode = "continuous", actors/stream.py): the engine takes new prompt
groups as sequences finish, weights land mid-stream, partial rollouts go on under the new version, and a step's
batch is its own groups, whole."""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.schema import PROMPT_SCHEMA

from ._helpers import ROOT, Killer, hf_logprobs, toy_args, update_mid_generation

pytestmark = pytest.mark.integration


def _prompts(first_group: int, prompts: list[list[int]]) -> pa.Table:
    n = len(prompts)
    return pa.Table.from_pydict({"prompt_id": list(range(n)), "group_id": list(range(first_group, first_group + n)),
                                 "prompt_ids": prompts, "answer": [""] * n}, schema=PROMPT_SCHEMA)


def test_a_continuous_engine_admits_groups_as_others_finish_and_tokens_keep_their_versions(tiny_model_dir, tmp_path,
                                                                                           monkeypatch):
    """Two chunks queued at once on an engine that holds 4 sequences (2 groups of 2): the first chunk's groups
    enter as earlier ones finish, the second chunk's only once version 1 is there (it needs it); version 1 lands
    while the first chunk is mid-way. Every row is a whole group in prompt order; each token's behaviour log-prob
    is that of the version that sampled it (transformers' pass), over the whole prefix; rows of the first chunk
    span both versions; the second chunk samples only with version 1. Without a weight change, a continuous
    engine samples exactly the completions a generate call samples (one seed per completion)."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    switch = tmp_path / "slow"
    monkeypatch.setenv("PROBE_RL_SLOW", f"decode_step:0.03:{switch}")  # 30 ms a decoding step, while it exists
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    rng = np.random.default_rng(0)
    first = [[1, *rng.integers(4, 30, int(k)).tolist()] for k in (3, 6, 2, 5, 4, 7)]
    second = [[1, *rng.integers(4, 30, int(k)).tolist()] for k in (4, 3, 5)]

    # Reference: without a weight change, the continuous engine and a plain generate call sample the same tokens.
    # (One vLLM engine at a time: an in-process engine's parallel state is the process's.)
    plain = Generator(model_path=str(tiny_model_dir), cfg=GeneratorConfig(max_new_tokens=24, max_model_len=64,
                      enforce_eager=True), weight_backend="probe_rl_inline")
    want, _ = plain.generate(_prompts(100, first[:3]), 2, 11)
    del plain
    gc.collect()
    cfg = GeneratorConfig(max_new_tokens=24, max_model_len=64, enforce_eager=True, update_mode="continuous")
    gen = Generator(model_path=str(tiny_model_dir), cfg=cfg, weight_backend="probe_rl_inline", stream_capacity=4)
    gen.admit("ref", _prompts(100, first[:3]), 2, 11, 0)
    got, _ = gen.take("ref", 120)
    assert got.column("completion_ids").to_pylist() == want.column("completion_ids").to_pylist()
    assert np.allclose(np.concatenate(got.column("behavior_logprobs").to_pylist()),
                       np.concatenate(want.column("behavior_logprobs").to_pylist()), atol=1e-5)

    switch.touch()
    updater, out = update_mid_generation(gen, new.state_dict(), 1, 12, switch)  # once tokens of version 0 are in
    assert gen.admit("a", _prompts(0, first), 2, 11, 0) == 1
    assert gen.admit("b", _prompts(10, second), 2, 11, 1) == 2
    a, a_stats = gen.take("a", 120)
    b, b_stats = gen.take("b", 120)
    updater.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert out["version"] == 1 and gen.version == 1
    for table, prompts, base in ((a, first, 0), (b, second, 10)):
        rows = table.to_pylist()
        assert [r["group_id"] for r in rows] == [base + i for i in range(len(prompts)) for _ in range(2)]
        assert [r["prompt_ids"] for r in rows] == [p for p in prompts for _ in range(2)]
    spanning = 0
    for r in a.to_pylist() + b.to_pylist():
        versions = r["behavior_versions"]
        assert len(versions) == len(r["completion_ids"]) == len(r["behavior_logprobs"])
        assert versions == sorted(versions) and set(versions) <= {0, 1}
        assert r["policy_version"] == min(versions)
        cut = versions.count(0)
        spanning += 0 < cut < len(versions)
        want_lp = (hf_logprobs(old, r["prompt_ids"], r["completion_ids"])[:cut]
                   + hf_logprobs(new, r["prompt_ids"], r["completion_ids"])[cut:])
        diff = np.abs(np.array(r["behavior_logprobs"]) - np.array(want_lp))
        assert (diff <= 1e-4).all(), (f"tokens {np.flatnonzero(diff > 1e-4).tolist()} of {len(diff)} (versions "
                                      f"{versions}) differ by up to {diff.max():.2e} from the sampling version's pass")
    assert spanning >= 1  # a partial rollout went on under the new version
    assert all(v == 1 for r in b.to_pylist() for v in r["behavior_versions"])  # b needed version 1
    assert a_stats.policy_version == 0 and b_stats.policy_version == 1
    assert a_stats.num_tokens == sum(len(c) for c in a.column("completion_ids").to_pylist())
    assert a_stats.seconds > 0 and b_stats.span_s > 0

    # Reset drops what is queued; a take of a dropped chunk fails at once, and the engine carries on.
    gen.admit("c", _prompts(20, second), 2, 11, 5)  # waits for a version that never comes
    assert gen.reset_stream() == 1
    with pytest.raises(RuntimeError, match="dropped"):
        gen.take("c", 5)
    gen.admit("d", _prompts(30, second[:1]), 2, 11, 1)
    d, _ = gen.take("d", 60)
    assert d.num_rows == 2
    greedy = gen.greedy([second[0]], 4)  # direct requests are stepped by the stream's thread too
    assert len(greedy) == 1 and 1 <= len(greedy[0]) <= 4


def test_a_continuous_run_trains_on_whole_groups_of_each_step_within_the_staleness_bound(toy_world, toy_overrides,
                                                                                          tmp_path):
    """The toy world in continuous mode, max_staleness 1, two generators, one SIGKILLed from outside mid-run: the
    run finishes, every step's batch holds exactly that step's prompt groups, each whole, once; every token of a
    step-s row was sampled by version s - 2 or newer; the generator was replaced."""
    args = toy_args(toy_overrides, tmp_path, "cont", 6) + [
        "--generator.update_mode", "continuous", "--generator.num_workers", "2", "--pipeline.max_staleness", "1",
        "--run.rollout_sample_per_step", "1000"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killer = Killer(tmp_path / "cont" / "metrics.parquet", [(2, "Generator")], driver.pid)
    killer.start()
    log, _ = driver.communicate(timeout=900)
    killer.join(timeout=5)
    assert driver.returncode == 0, log[-3000:]
    assert [k[0] for k in killer.killed] == ["Generator"]
    assert "generator" in log and "starting a replacement" in log, log[-3000:]
    rows = pq.read_table(tmp_path / "cont" / "metrics.parquet").to_pylist()
    assert [r["rollout/rows"] for r in rows] == [32] * 6  # 8 prompts x 4 completions, every step whole, once
    assert all(r["pipeline/staleness"] <= 1 and r["rollout/token_staleness_max"] <= 1 for r in rows)
    samples = pq.read_table(tmp_path / "cont" / "rollouts.parquet").to_pylist()
    _, world = toy_world
    for step in range(1, 7):
        got = [s for s in samples if s["step"] == step]
        want = world.prompts_for_step(step, 8, 0).column("group_id").to_pylist()
        assert sorted(s["group_id"] for s in got) == sorted(g for g in want for _ in range(4))  # its own groups, whole
        assert all(min(s["behavior_versions"]) >= max(0, step - 2) for s in got)  # the staleness bound, per token
