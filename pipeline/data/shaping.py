"""Reward shaping and GRPO advantages: pure functions over numpy arrays.

The probe score is a probability in [0, 1] that a completion shows the probed concept (a reward
hack, say). It only ever enters as a scalar added to the reward: no gradient flows through a probe.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ShapingKind = Literal["none", "penalty", "threshold", "screen", "loss", "ablate"]
IN_REWARD = ("penalty", "threshold", "screen")  # kinds that act through the reward; loss and ablate act on activations


def shape_rewards(
    task_reward: np.ndarray,  # (B,)
    score: np.ndarray | None,  # (B,) probe probability, or None with kind "none"
    kind: ShapingKind,
    coef: float = 1.0,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Shaped reward (B,) float32 and loss mask (B,) bool (False: the sample gets no gradient).

    none, loss, ablate: task reward (loss and ablate act on the learner's activations, not on the reward).
    penalty: reward - coef * score. threshold: reward - coef where score > threshold.
    screen: reward unchanged, flagged samples (score > threshold) masked out of the gradient.
    Rows whose score is not finite are always masked out and keep their task reward.
    """
    task_reward = np.asarray(task_reward, dtype=np.float32)
    mask = np.ones(task_reward.shape, dtype=bool)
    if kind not in IN_REWARD:
        if kind not in ("none", "loss", "ablate"):
            raise ValueError(f"unknown shaping kind {kind!r}; allowed: none, penalty, threshold, screen, loss, ablate")
        return task_reward.copy(), mask
    if score is None:
        raise ValueError(f"shaping kind {kind!r} needs a probe score")
    score = np.asarray(score, dtype=np.float32)
    finite = np.isfinite(score)
    safe = np.where(finite, score, 0.0).astype(np.float32)
    if kind == "penalty":
        shaped = task_reward - coef * safe
    elif kind == "threshold":
        shaped = task_reward - coef * (safe > threshold).astype(np.float32)
    elif kind == "screen":
        shaped = task_reward.copy()
        mask &= ~(safe > threshold)
    else:
        raise ValueError(f"unknown shaping kind {kind!r}; allowed: none, penalty, threshold, screen")
    mask &= finite
    return shaped.astype(np.float32), mask


def group_advantages(
    reward: np.ndarray,  # (B,)
    group_id: np.ndarray,  # (B,)
    mask: np.ndarray | None = None,  # (B,) rows excluded from the gradient and from their group's statistics
    eps: float = 1e-6,
) -> np.ndarray:
    """GRPO advantages: (r - mean_group) / (std_group + eps); masked rows get 0. Returns (B,) float32."""
    reward = np.asarray(reward, dtype=np.float64)
    mask = np.ones(reward.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    adv = np.zeros(reward.shape, dtype=np.float64)
    for g in np.unique(group_id):
        rows = (group_id == g) & mask
        if rows.sum() < 2:
            continue  # a lone sample has no baseline to compare with
        r = reward[rows]
        adv[rows] = (r - r.mean()) / (r.std() + eps)
    return adv.astype(np.float32)


def evasion_rate(score: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Share of the hacks (by ground truth) that the probe scores below `threshold`: the hacks it misses. NaN when
    there is no hack (or no finite score for one) to miss."""
    hacks = (np.asarray(truth) == "hack") & np.isfinite(score)
    return float((score[hacks] < threshold).mean()) if hacks.any() else float("nan")
