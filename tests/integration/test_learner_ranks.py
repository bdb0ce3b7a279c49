"""The learner on 2 DeepSpeed ranks (ZeRO-2, ZeRO-3, gloo) reaches the same weights as on 1 rank."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

pytestmark = pytest.mark.integration


def _batch(model_path: str, rows: int, seed: int) -> pa.Table:
    """A train table with real behaviour log-probs (so PPO ratios start at 1) and fixed advantages."""
    from transformers import AutoModelForCausalLM

    from learner.losses import token_logprobs
    from pipeline.batching import pack
    from pipeline.schema import NONFINITE, REF_LOGPROBS, REWARD_FIELDS, ROLLOUT_SCHEMA

    rng = np.random.default_rng(seed)
    prompts = [[1, *rng.integers(4, 14, 3).tolist(), 14, *rng.integers(4, 14, 2).tolist(), 17] for _ in range(rows)]
    comps = [rng.integers(4, 14, rng.integers(1, 4)).tolist() + [2] for _ in range(rows)]
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    b = pack(prompts, comps)
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids)
    behavior = [v.tolist() for v in b.completion_values(lp, shift=1)]
    table = pa.Table.from_pydict({"prompt_id": list(range(rows)), "group_id": [i // 4 for i in range(rows)],
                                  "prompt_ids": prompts, "completion_ids": comps, "behavior_logprobs": behavior,
                                  "policy_version": [0] * rows, "answer": [""] * rows}, schema=ROLLOUT_SCHEMA)
    table = table.append_column(REF_LOGPROBS, pa.array(behavior, REF_LOGPROBS.type))
    table = table.append_column(NONFINITE, pa.array([False] * rows))
    reward = rng.random(rows).astype(np.float32)
    mask = np.ones(rows, bool)
    mask[3] = False  # a screened row: must carry no gradient on any rank
    adv = rng.standard_normal(rows).astype(np.float32) * mask
    for f, v in zip(REWARD_FIELDS, (reward, reward, mask, adv), strict=True):
        table = table.append_column(f, pa.array(v, f.type))
    return table


def _train(model_path, zero_stage, ranks, batches):
    from learner.learner import Learner
    from pipeline.config import LearnerConfig
    from pipeline.remote import free_port, make_actor, wait
    from pipeline.weights import from_wire

    cfg = LearnerConfig(zero_stage=zero_stage, num_ranks=ranks, lr=1e-3, kl_coef=0.05, micro_batch_size=8,
                        warmup_steps=0)
    port = free_port()
    actors = [make_actor(Learner, "learner", 0.5, 0, None, model_path, cfg, batches[0].num_rows, r, ranks,
                         "127.0.0.1", port) for r in range(ranks)]
    stats = []
    for batch in batches:
        stats.append(wait([a.train_step.remote(batch) for a in actors], "learner", 300))
    wire = wait([a.get_weights.remote() for a in actors], "learner", 300)[0]
    import ray

    for a in actors:
        ray.kill(a)
    return from_wire(wire), stats


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank(toy_world, ray_local, zero_stage):
    _, world = toy_world
    batches = [_batch(world.model_path, 16, seed) for seed in (0, 1)]
    one, stats1 = _train(world.model_path, zero_stage, 1, batches)
    two, stats2 = _train(world.model_path, zero_stage, 2, batches)
    assert set(one) == set(two)
    moved = max((one[k] - torch.as_tensor(v)).abs().max().item() for k, v in _initial(world.model_path).items())
    assert moved > 1e-4  # training changed the weights, so agreement below means something
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # the ranks together saw every valid token once
    assert sum(s.num_tokens for s in stats2[0]) == stats1[0][0].num_tokens


def _initial(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path).state_dict()
