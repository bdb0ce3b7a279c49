"""Helpers shared by the integration tests: train tables with real behaviour log-probs, learner ranks that
meet as the fleet starts them, one collective weight sync, and transformers' greedy completions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import LearnerConfig
from pipeline.weights import BACKEND_GLOO

TIMEOUT = 300


def train_batch(model_path: str, rows: int, seed: int) -> pa.Table:
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


def start_learners(model_path: str, cfg: LearnerConfig, rows: int) -> list:
    from learner.learner import Learner
    from pipeline.fleet import setup_learners
    from pipeline.remote import make_actor

    actors = [make_actor(Learner, "learner", 0.5, 0, model_path=model_path, cfg=cfg, rows_per_step=rows, rank=r,
                         world_size=cfg.num_ranks) for r in range(cfg.num_ranks)]
    setup_learners(actors, TIMEOUT)
    return actors


def collective_sync(learners, receivers, bucket_bytes=2**20, timeout_s=60.0, name="test"):
    """Build a transfer group of `learners` and `receivers` (Receiver objects), send once; SendStats per rank."""
    from pipeline.remote import ReceiverClient, wait

    client = ReceiverClient(receivers, TIMEOUT)
    wait([lr.init_weight_transfer.remote(client, BACKEND_GLOO, bucket_bytes, timeout_s, name) for lr in learners],
         "learner", TIMEOUT)
    return wait([lr.send_weights.remote() for lr in learners], "learner", TIMEOUT)


def hf_greedy(model_dir, prompt_ids, max_new_tokens=8):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out
