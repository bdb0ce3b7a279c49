import numpy as np
import pytest

from pipeline.data.shaping import group_advantages, shape_rewards

R = np.array([1.0, 0.0, 1.0, 0.5], dtype=np.float32)
S = np.array([0.9, 0.2, 0.4, 0.6], dtype=np.float32)


def test_none_returns_task_reward_unmasked():
    shaped, mask = shape_rewards(R, None, "none")
    np.testing.assert_array_equal(shaped, R)
    assert mask.all()


def test_penalty_subtracts_coef_times_score():
    shaped, mask = shape_rewards(R, S, "penalty", coef=0.5)
    np.testing.assert_allclose(shaped, [0.55, -0.1, 0.8, 0.2], rtol=1e-6)
    assert mask.all()


def test_threshold_subtracts_fixed_penalty_above_threshold():
    shaped, mask = shape_rewards(R, S, "threshold", coef=2.0, threshold=0.5)
    np.testing.assert_allclose(shaped, [-1.0, 0.0, 1.0, -1.5])
    assert mask.all()


def test_screen_masks_flagged_samples_only():
    shaped, mask = shape_rewards(R, S, "screen", threshold=0.5)
    np.testing.assert_array_equal(shaped, R)
    np.testing.assert_array_equal(mask, [False, True, True, False])


@pytest.mark.parametrize("kind", ["penalty", "threshold", "screen"])
def test_nonfinite_scores_are_masked_not_used(kind):
    score = np.array([np.nan, 0.1, np.inf, 0.2], dtype=np.float32)
    shaped, mask = shape_rewards(R, score, kind, coef=1.0, threshold=0.5)
    assert np.isfinite(shaped).all()
    assert not mask[0] and not mask[2] and mask[1] and mask[3]


def test_shaping_without_score_is_an_error():
    with pytest.raises(ValueError, match="needs a probe score"):
        shape_rewards(R, None, "penalty")


def test_group_advantages_match_hand_computation():
    reward = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    group = np.array([7, 7, 7, 9, 9, 9])
    adv = group_advantages(reward, group, eps=0.0)
    m, s = 1 / 3, np.sqrt(2 / 9)
    np.testing.assert_allclose(adv[:3], [(1 - m) / s, -m / s, -m / s], rtol=1e-5)
    m2, s2 = 5 / 3, np.sqrt(2 / 9)
    np.testing.assert_allclose(adv[3:], [(1 - m2) / s2, (2 - m2) / s2, (2 - m2) / s2], rtol=1e-5)


def test_group_advantages_exclude_masked_rows_from_statistics():
    reward = np.array([1.0, 0.0, 100.0, 0.5])
    group = np.zeros(4, dtype=int)
    mask = np.array([True, True, False, True])
    adv = group_advantages(reward, group, mask, eps=0.0)
    assert adv[2] == 0.0
    ref = np.array([1.0, 0.0, 0.5])
    np.testing.assert_allclose(adv[[0, 1, 3]], (ref - ref.mean()) / ref.std(), rtol=1e-5)


def test_uniform_group_has_zero_advantage():
    adv = group_advantages(np.ones(4), np.zeros(4, dtype=int))
    np.testing.assert_array_equal(adv, np.zeros(4))


def test_scorer_load_measures_queueing_from_wall_clock_stamps():
    from actors.generator import GenerateStats
    from actors.scorer import ScoreStats
    from pipeline.loop.fleet import scorer_load

    # two chunks: generated over [0, 1] and [1, 2]; scored over [1, 1.5] (no wait) and [2.5, 3] (waited 0.5 s)
    gen = [GenerateStats(1.0, 10, 0, end_time=101.0), GenerateStats(1.0, 10, 0, end_time=102.0)]
    score = [ScoreStats(0.5, 4, 40, 0, start_time=101.0), ScoreStats(0.5, 4, 40, 0, start_time=102.5)]
    load = scorer_load(gen, score)
    assert load.wait_s == pytest.approx(0.25) and load.busy_s == pytest.approx(1.0)
    assert load.span_s == pytest.approx(3.0) and load.backlog == pytest.approx(0.25 / 3.0)


def test_scorer_scaling_decision():
    from pipeline.config import ScorerConfig
    from pipeline.loop.fleet import ScorerLoad, scale_decision

    cfg = ScorerConfig(num_workers=1, max_workers=3, scale_up_wait=0.2, scale_down_busy=0.5, scale_down_steps=3)
    lagging = ScorerLoad(wait_s=1.0, busy_s=3.0, span_s=3.0, backlog=1 / 3)
    idle = ScorerLoad(wait_s=0.0, busy_s=0.2, span_s=2.0, backlog=0.0)
    busy = ScorerLoad(wait_s=0.0, busy_s=1.9, span_s=2.0, backlog=0.0)
    assert scale_decision(lagging, 1, False, 0, cfg) == (1, 0)  # chunks wait: add one
    assert scale_decision(lagging, 2, True, 0, cfg) == (0, 0)  # one is joining already: one at a time
    assert scale_decision(lagging, 3, False, 2, cfg) == (0, 0)  # at the maximum; the idle streak resets
    assert scale_decision(idle, 2, False, 0, cfg) == (0, 1)  # idle, but not for long yet
    assert scale_decision(idle, 2, False, 2, cfg) == (-1, 0)  # idle for 3 steps: retire one
    assert scale_decision(idle, 1, False, 2, cfg) == (0, 0)  # never below the minimum
    assert scale_decision(busy, 2, False, 2, cfg) == (0, 0)  # one alone would be busy 95% of the step: keep both
