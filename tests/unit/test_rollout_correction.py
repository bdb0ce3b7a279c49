"""Rollout corrections and mismatch measures (learner/losses.py) against values worked out by hand on small
tensors: a row whose weights straddle the threshold, a row wholly beyond it, a masked row holding NaNs."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import combine_sums, correction_weights, mismatch_metrics, mismatch_sums, ppo_loss

L = math.log
# learner's own probabilities (old) and the generator's (behaviour) of each token; weights w = old / behaviour
OLD = torch.tensor([[L(0.5), L(0.25), L(0.1)], [L(0.8), L(0.8), 0.0], [L(0.3), 0.0, 0.0]])
BEH = torch.tensor([[L(0.25), L(0.5), L(0.1)], [L(0.2), L(0.2), float("nan")], [float("nan"), 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)  # row 0: w = 2, .5, 1; row 1: 4, 4


@pytest.mark.parametrize("mode, want", [
    ("tis", [[1.5, 0.5, 1.0], [1.5, 1.5, 0.0]]),  # truncated at the threshold
    ("mis_token", [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),  # outside [1/1.5, 1.5]: masked
    ("decoupled", [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]),  # above the cap: masked; below kept
    ("mis_sequence", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]),  # row products 1 (kept) and 16 (masked)
    ("geometric", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]),  # row geometric means 1 (kept) and 4 (masked)
    ("geometric_weighted", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]),
])
def test_correction_weights_by_hand(mode, want):
    w = correction_weights(OLD, BEH, MASK, mode, threshold=1.5)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[:2], torch.tensor(want), atol=1e-6)
    assert (w[2] == 0).all()  # a masked row: nothing, and its NaNs reach nothing


def test_geometric_and_sequence_weights_with_their_own_bounds():
    w = correction_weights(OLD, BEH, MASK, "geometric_weighted", threshold=5.0, low=0.5)  # row 1's mean 4 passes
    assert torch.allclose(w[1, :2], torch.tensor([4.0, 4.0])) and w[1, 2] == 0
    w = correction_weights(OLD, BEH, MASK, "geometric", threshold=5.0, low=0.5)  # kept, but not weighted
    assert torch.allclose(w[1, :2], torch.tensor([1.0, 1.0])) and w[1, 2] == 0
    assert (correction_weights(OLD, BEH, MASK, "geometric", threshold=3.0, low=0.5)[1] == 0).all()  # 4 > 3
    w = correction_weights(OLD, BEH, MASK, "mis_sequence", threshold=20.0)  # row 1's product 16 passes
    assert torch.allclose(w[1, :2], torch.tensor([16.0, 16.0]))
    with pytest.raises(ValueError, match="unknown correction"):
        correction_weights(OLD, BEH, MASK, "bogus")


def test_corrected_loss_weights_each_tokens_gradient_and_takes_the_ratio_against_the_learner():
    logp = OLD.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 3.0])
    parts = ppo_loss(logp, BEH, adv, MASK, clip_eps=0.2, num_tokens=5.0, correction="tis", threshold=1.5)
    w = torch.tensor([[1.5, 0.5, 1.0], [1.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    # the ratio against the learner's own log-probs is 1 at this point: the loss is -sum(w A) / N ...
    assert parts.policy_loss.item() == pytest.approx(-(1.5 + 0.5 + 1.0 - 2 * 3.0) / 5.0)
    parts.loss.backward()
    # ... and each token's gradient is -w A / N (the PPO clip cannot bind at ratio 1)
    assert torch.allclose(logp.grad, -w * adv[:, None] / 5.0)
    assert parts.clip_frac.item() == 0.0
    off = ppo_loss(OLD.clone(), BEH, adv, MASK, clip_eps=0.2, num_tokens=5.0)  # today's: ratio against behaviour
    assert off.policy_loss.item() != pytest.approx(parts.policy_loss.item())


def test_mismatch_sums_and_metrics_by_hand():
    staleness = torch.tensor([0, 2, 0])
    sums = mismatch_sums(OLD, BEH, MASK, staleness, threshold=1.5)
    # fresh rows: row 0 (row 2 has no measured token); r = log 2, log .5, 0
    assert sums["mismatch/abs_sum"] == pytest.approx(2 * L(2))
    assert sums["mismatch/abs_max"] == pytest.approx(L(2))
    assert sums["mismatch/k3_sum"] == pytest.approx((2 - L(2) - 1) + (0.5 + L(2) - 1))
    assert sums["mismatch/seq_abs_sum"] == pytest.approx(0.0, abs=1e-12)
    assert (sums["mismatch/beyond"], sums["mismatch/tokens"], sums["mismatch/rows"]) == (2, 3, 1)
    # stale rows by staleness: row 1, r = log 4 twice
    assert sums["mismatch/stale2/abs_sum"] == pytest.approx(2 * L(4))
    assert sums["mismatch/stale2/seq_abs_sum"] == pytest.approx(2 * L(4))
    # two micro-batches or ranks: sums add, maxima stay maxima; metrics divide by tokens and rows
    m = mismatch_metrics([sums, combine_sums([sums])])
    assert m["mismatch/log_ratio_abs_mean"] == pytest.approx(2 * L(2) / 3)
    assert m["mismatch/log_ratio_abs_max"] == pytest.approx(L(2))
    assert m["mismatch/beyond_threshold"] == pytest.approx(2 / 3)
    assert m["mismatch/stale2/k3"] == pytest.approx(4 - L(4) - 1)
    assert m["mismatch/stale2/tokens"] == 4.0 and m["mismatch/tokens"] == 6.0


def test_wild_log_ratios_are_clamped_before_exp_as_verl_does():
    from learner.losses import K3_CLAMP, LOG_RATIO_CLAMP, k3_kl

    logp = torch.tensor([[0.0, -1.0, -80.0]], requires_grad=True)
    beh = torch.tensor([[-60.0, -1.0, 0.0]])  # a token 60 nats likelier to the learner than to the generator
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = correction_weights(logp, beh, mask, "tis", threshold=1e12)
    assert w[0, 0].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-5)  # not e^60
    assert w[0, 2].item() == pytest.approx(math.exp(-LOG_RATIO_CLAMP), rel=1e-5)
    parts = ppo_loss(logp, beh, torch.tensor([1.0]), mask, clip_eps=0.2, ref_logp=beh, kl_coef=0.1)
    assert torch.isfinite(parts.loss)
    kl = k3_kl(logp, beh)
    # k3 of a log-ratio of 80 would be e^80 - 81; clamped to 10, as is the -60 side (e^-20 + 20 - 1 > 10)
    assert kl[0, 2].item() == K3_CLAMP and kl[0, 0].item() == K3_CLAMP and kl[0, 1].item() == 0.0
    parts.loss.backward()
    assert torch.isfinite(logp.grad).all()
    # within the bounds nothing changes: k3 by hand at a log-ratio of 0.5
    assert k3_kl(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(math.exp(0.5) - 1.5)
