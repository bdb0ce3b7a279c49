"""Policy-gradient losses: pure torch functions on padded (B, T) completion tensors.

Tokens outside the mask are excluded with `torch.where`, never by multiplying by the mask: NaN x 0 is NaN, so
one row with a non-finite log-prob would otherwise poison the whole step. Log-probs of sampled tokens come
from `pipeline.data.logprobs`, shared with the scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar: policy loss + kl_coef * kl, what backward() sees
    policy_loss: torch.Tensor  # scalar
    kl: torch.Tensor  # scalar, mean k3 estimate over valid tokens
    clip_frac: torch.Tensor  # scalar, fraction of valid tokens whose ratio was clipped
    num_tokens: torch.Tensor  # scalar, valid tokens


# Bounds on log-ratios before `exp` and on the k3 estimate, as veRL sets them (core_algos.py: kl_penalty's
# low_var_kl, rollout_corr_helper.py): a token the learner finds e^20 times likelier than the generator did is
# a numerical accident, not a weight, and one such token must not turn a step's loss into inf. Clamped values
# carry no gradient, so a token past a bound stops pushing.
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref) from samples of the policy (Schulman): always >= 0; the
    log-ratio clamped to +-LOG_RATIO_CLAMP before exp, the estimate to at most K3_CLAMP (veRL's low_var_kl)."""
    log_ratio = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, max=K3_CLAMP)


CORRECTIONS = ("off", "tis", "mis_token", "mis_sequence", "geometric", "geometric_weighted", "decoupled")


def correction_weights(old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       threshold: float = 2.0, low: float | None = None) -> torch.Tensor:
    """(B, T) importance weight of each masked token from the learner's own log-probs `old_logp` (no gradient) to
    the behaviour log-probs, as `mode` treats it (pipeline/config.py: RolloutCorrection); 0 off the mask. A row
    whose every token lies beyond the threshold gets weight 0 throughout (masking modes) or the threshold (tis)."""
    if mode not in CORRECTIONS or mode == "off":
        raise ValueError(f"unknown correction {mode!r}; allowed: {', '.join(CORRECTIONS[1:])}")
    low = 1.0 / threshold if low is None else low
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_w = torch.where(mask, old_logp.detach() - torch.where(mask, behavior_logp, old_logp.detach()), zero)
    log_w = torch.clamp(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = torch.exp(log_w)
    if mode == "tis":
        out = torch.clamp(w, max=threshold)
    elif mode == "mis_token":
        out = torch.where((w >= low) & (w <= threshold), w, zero)
    elif mode == "decoupled":
        out = torch.where(w <= threshold, w, zero)
    else:
        count = mask.sum(-1)
        seq_log = log_w.sum(-1)
        row_log = seq_log if mode == "mis_sequence" else seq_log / count.clamp(min=1)
        row = torch.exp(torch.clamp(row_log, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        keep = (row >= low) & (row <= threshold) & (count > 0)
        kept = torch.ones_like(row) if mode == "geometric" else row  # geometric rejects only (veRL's geometric RS)
        out = torch.where(keep, kept, zero)[:, None].expand_as(w)
    return torch.where(mask, out, zero)


def mismatch_sums(old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor, staleness: torch.Tensor,
                  threshold: float = 2.0, low: float | None = None) -> dict[str, float]:
    """Sums behind the mismatch metrics, per staleness s of the rows (the learner's version minus the version that
    sampled them; `mismatch/` for s = 0, `mismatch/stale<s>/` otherwise), to be added over micro-batches and
    ranks and divided by `learner.mismatch_metrics`: with r_t = learner log-prob minus behaviour log-prob of token
    t, |r_t| summed and its max, the k3 estimate of KL(behaviour || learner) exp(r) - r - 1 summed, each row's
    |sum_t r_t| summed, tokens whose weight exp(r_t) lies outside [low, threshold], tokens and rows."""
    low = 1.0 / threshold if low is None else low
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=old_logp.device)
    r = torch.where(mask, old_logp.detach().double() - torch.where(mask, behavior_logp, old_logp.detach()).double(), zero)
    out: dict[str, float] = {}
    for s in sorted(set(staleness.tolist())):
        rows = (staleness == s) & mask.any(-1)
        if not rows.any():
            continue
        m = mask & rows[:, None]
        key = "mismatch/" if s == 0 else f"mismatch/stale{int(s)}/"
        a = torch.where(m, r.abs(), zero)
        w = torch.exp(r)
        out[key + "abs_sum"] = float(a.sum())
        out[key + "abs_max"] = float(a.max())
        out[key + "k3_sum"] = float(torch.where(m, torch.exp(r) - r - 1, zero).sum())
        out[key + "seq_abs_sum"] = float(torch.where(m, r, zero).sum(-1).abs()[rows].sum())
        out[key + "beyond"] = float((m & ((w < low) | (w > threshold))).sum())
        out[key + "tokens"] = float(m.sum())
        out[key + "rows"] = float(rows.sum())
    return out


def combine_sums(parts: list[dict[str, float]]) -> dict[str, float]:
    """`mismatch_sums` of several micro-batches or ranks as one: sums add, maxima stay maxima."""
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = max(total.get(k, v), v) if k.endswith("abs_max") else total.get(k, 0.0) + v
    return total


def mismatch_metrics(sums: list[dict[str, float]]) -> dict[str, float]:
    """Metric values from `mismatch_sums` of every micro-batch and rank: per staleness group, the mean and max
    |log-ratio| per token, the k3 KL per token, the mean |sequence log-ratio| per row, the share of tokens
    beyond the threshold, and the tokens measured."""
    total = combine_sums(sums)
    out = {}
    for prefix in sorted({k.rsplit("/", 1)[0] + "/" for k in total}):
        tokens, rows = total[prefix + "tokens"], total[prefix + "rows"]
        if not tokens:
            continue
        out[prefix + "log_ratio_abs_mean"] = total[prefix + "abs_sum"] / tokens
        out[prefix + "log_ratio_abs_max"] = total[prefix + "abs_max"]
        out[prefix + "k3"] = total[prefix + "k3_sum"] / tokens
        out[prefix + "seq_log_ratio_abs_mean"] = total[prefix + "seq_abs_sum"] / rows
        out[prefix + "beyond_threshold"] = total[prefix + "beyond"] / tokens
        out[prefix + "tokens"] = tokens
    return out


def ppo_loss(
    logp: torch.Tensor,  # (B, T) current policy log-probs of the sampled tokens
    behavior_logp: torch.Tensor,  # (B, T) log-probs under the policy that sampled them
    advantages: torch.Tensor,  # (B,)
    token_mask: torch.Tensor,  # (B, T) 1 on completion tokens of rows that get a gradient
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,  # (B, T), None: no KL term
    kl_coef: float = 0.0,
    num_tokens: float | None = None,  # normaliser; default: valid tokens in this batch
    correction: str = "off",  # rollout correction mode (pipeline/config.py: RolloutCorrection)
    threshold: float = 2.0,
    low: float | None = None,
) -> LossParts:
    """PPO-clipped surrogate, token-level mean, plus kl_coef * k3 KL to the reference. With a rollout
    correction, the PPO ratio is taken against the learner's own log-probs (`logp`, detached: the version it
    trains) and each token's surrogate is multiplied by its correction weight."""
    mask = token_mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    denom = torch.as_tensor(num_tokens if num_tokens is not None else mask.sum().clamp(min=1).float())
    # Masked positions get neutral inputs before any arithmetic, so their NaNs reach neither value nor gradient.
    behavior = torch.where(mask, behavior_logp, logp.detach())
    weight = None
    if correction != "off":
        weight = correction_weights(logp, behavior_logp, mask, correction, threshold, low)
        behavior = logp.detach()  # the proximal policy: the learner's own
    adv = torch.where(mask, advantages[:, None], zero)
    ratio = torch.exp(torch.clamp(torch.where(mask, logp - behavior, zero), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if weight is not None:
        surrogate = weight * surrogate
    policy_loss = -torch.where(mask, surrogate, zero).sum() / denom
    clip_frac = (((ratio - 1).abs() > clip_eps) & mask).sum() / denom
    if ref_logp is not None and kl_coef > 0:
        kl = torch.where(mask, k3_kl(logp, torch.where(mask, ref_logp, logp.detach())), zero).sum() / denom
    else:
        kl = zero
    return LossParts(policy_loss + kl_coef * kl, policy_loss.detach(), kl.detach(), clip_frac.detach(), mask.sum())
