"""The learner on 2 DeepSpeed ranks (ZeRO-2, ZeRO-3, gloo) reaches the same weights as on 1 rank."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LearnerConfig

from ._helpers import TIMEOUT, start_learners, train_batch

pytestmark = pytest.mark.integration


def _train(model_path, zero_stage, ranks, batches):
    import ray

    from pipeline.remote import wait
    from pipeline.weights import from_wire

    cfg = LearnerConfig(zero_stage=zero_stage, num_ranks=ranks, lr=1e-3, kl_coef=0.05, micro_batch_size=8,
                        warmup_steps=0)
    actors = start_learners(model_path, cfg, batches[0].num_rows)
    stats = [wait([a.train_step.remote(batch) for a in actors], "learner", TIMEOUT) for batch in batches]
    wire = wait([a.get_weights.remote() for a in actors], "learner", TIMEOUT)[0]
    for a in actors:
        ray.kill(a)
    return from_wire(wire), stats


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank(toy_world, ray_local, zero_stage):
    _, world = toy_world
    batches = [train_batch(world.model_path, 16, seed) for seed in (0, 1)]
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

    return dict(AutoModelForCausalLM.from_pretrained(model_path).named_parameters())
