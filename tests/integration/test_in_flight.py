"""Weights that reach a generator mid-rollout (generator.update_mode = "in_flight"): a rollout that spans two
versions records the version of every token, and each token's behaviour log-prob is that of the version that
sampled it, over the whole prefix (vLLM re-prefills unfinished sequences under the new weights)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.schema import PROMPT_SCHEMA

from ._helpers import hf_logprobs, update_mid_generation

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("engine_process", ["in_process", "separate"])
def test_a_rollout_spanning_two_versions_has_each_tokens_version_and_log_prob(tiny_model_dir, tmp_path, monkeypatch,
                                                                              engine_process):
    """In-process, the generate loop and the weight calls take turns at the engine; with vLLM's separate engine
    process, which steps by itself, the update pauses its scheduler ("keep") and resumes it after."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    switch = tmp_path / "slow"
    monkeypatch.setenv("PROBE_RL_SLOW", f"decode_step:0.05:{switch}")  # 50 ms a decoding step, while it exists
    cfg = GeneratorConfig(max_new_tokens=24, max_model_len=64, engine_process=engine_process, enforce_eager=True,
                          update_mode="in_flight")
    gen = Generator(model_path=str(tiny_model_dir), cfg=cfg, weight_backend="probe_rl_inline")
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14], [1, 20]]
    table = pa.Table.from_pydict({"prompt_id": [0, 1, 2], "group_id": [0, 1, 2], "prompt_ids": prompts,
                                  "answer": ["", "", ""]}, schema=PROMPT_SCHEMA)
    switch.touch()
    updater, out = update_mid_generation(gen, new.state_dict(), 1, 5, switch)  # once tokens of version 0 are in
    table, _ = gen.generate(table, 3, 11)
    updater.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert out["version"] == 1
    rows = table.to_pylist()
    spanning = 0
    for r in rows:
        versions = r["behavior_versions"]
        assert len(versions) == len(r["completion_ids"]) == len(r["behavior_logprobs"])
        assert versions == sorted(versions) and set(versions) <= {0, 1}  # 0 ... 0 1 ... 1
        assert r["policy_version"] == min(versions)
        cut = versions.count(0)
        spanning += 0 < cut < len(versions)
        want = (hf_logprobs(old, r["prompt_ids"], r["completion_ids"])[:cut]
                + hf_logprobs(new, r["prompt_ids"], r["completion_ids"])[cut:])
        diff = np.abs(np.array(r["behavior_logprobs"]) - np.array(want))
        assert (diff <= 1e-4).all(), (f"tokens {np.flatnonzero(diff > 1e-4).tolist()} of {len(diff)} (versions "
                                      f"{versions}) differ by up to {diff.max():.2e} from the sampling version's pass")
    assert spanning >= 6  # most of the 9 rollouts were mid-way when the weights arrived
    assert gen.version == 1

    # A generate call launched after the driver published version 2 samples nothing with version 1, even though
    # the load of version 2 (the weights concurrency group) reaches the generator only after the call began.
    def late_load() -> None:
        try:
            time.sleep(1.0)
            out["late"] = gen.load_weights({k: v.clone() for k, v in old.state_dict().items()}, 2)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    loader = threading.Thread(target=late_load)
    loader.start()
    began = time.monotonic()
    one = pa.Table.from_pydict({"prompt_id": [0], "group_id": [0], "prompt_ids": [prompts[0]], "answer": [""]},
                               schema=PROMPT_SCHEMA)
    again, stats = gen.generate(one, 2, 11, min_version=2)
    loader.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert time.monotonic() - began >= 1.0 and out["late"] == 2
    assert stats.policy_version == 2
    assert all(v == 2 for r in again.to_pylist() for v in r["behavior_versions"])
    with pytest.raises(RuntimeError, match="still on weights version 2"):
        gen._await_version(3, timeout_s=0.2)


def test_a_synced_generator_samples_with_the_new_weights_at_batch_shapes_it_ran_before(tiny_model_dir):
    """The same prompts before and after a weight update that comes on another thread (the weights thread of a
    generator whose updates land mid-generation; between steps they come on the generating thread): every behaviour log-prob
    afterwards is the new weights' (transformers' pass). On an AVX2-only CPU, vLLM's oneDNN linear handlers kept
    computing with the old weights for batch shapes they had run before such an update (off by up to 1.8 nats);
    probe-rl's engines run their linear layers without them (pipeline/transport/vllm_weights.py:
    `linear_without_onednn`)."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    gen = Generator(model_path=str(tiny_model_dir), cfg=GeneratorConfig(max_new_tokens=12, max_model_len=64,
                    enforce_eager=True, update_mode="in_flight"), weight_backend="probe_rl_inline")
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(4, 30, int(k)).tolist()] for k in (3, 6, 2, 5, 4, 7)]
    table = pa.Table.from_pydict({"prompt_id": list(range(6)), "group_id": list(range(6)), "prompt_ids": prompts,
                                  "answer": [""] * 6}, schema=PROMPT_SCHEMA)
    gen.generate(table, 2, 11)  # every batch shape of this call runs once with version 0
    out: dict = {}  # the update comes on another thread, as Ray's weights concurrency group delivers it
    loader = threading.Thread(target=lambda: out.update(v=gen.load_weights({k: v.clone() for k, v in
                                                                            new.state_dict().items()}, 1)))
    loader.start()
    loader.join(timeout=120)
    assert out.get("v") == 1
    after, _ = gen.generate(table, 2, 11)
    worst = 0.0
    for r in after.to_pylist():
        assert set(r["behavior_versions"]) == {1}
        want = hf_logprobs(new, r["prompt_ids"], r["completion_ids"])
        worst = max(worst, float(np.abs(np.array(r["behavior_logprobs"]) - np.array(want)).max()))
    assert worst <= 1e-4, f"behaviour log-probs differ from the synced weights' by up to {worst:.2e}"
