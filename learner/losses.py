"""Policy-gradient losses: pure torch functions on padded (B, T) completion tensors.

Tokens outside the mask are excluded with `torch.where`, never by multiplying by the mask: NaN x 0 is NaN, so
one row with a non-finite log-prob would otherwise poison the whole step. Log-probs of sampled tokens come
from `pipeline.logprobs`, shared with the scorer."""

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


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref) from samples of the policy (Schulman): always >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def ppo_loss(
    logp: torch.Tensor,  # (B, T) current policy log-probs of the sampled tokens
    behavior_logp: torch.Tensor,  # (B, T) log-probs under the policy that sampled them
    advantages: torch.Tensor,  # (B,)
    token_mask: torch.Tensor,  # (B, T) 1 on completion tokens of rows that get a gradient
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,  # (B, T), None: no KL term
    kl_coef: float = 0.0,
    num_tokens: float | None = None,  # normaliser; default: valid tokens in this batch
) -> LossParts:
    """PPO-clipped surrogate, token-level mean, plus kl_coef * k3 KL to the reference."""
    mask = token_mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    denom = torch.as_tensor(num_tokens if num_tokens is not None else mask.sum().clamp(min=1).float())
    # Masked positions get neutral inputs before any arithmetic, so their NaNs reach neither value nor gradient.
    behavior = torch.where(mask, behavior_logp, logp.detach())
    adv = torch.where(mask, advantages[:, None], zero)
    ratio = torch.exp(torch.where(mask, logp - behavior, zero))
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    policy_loss = -torch.where(mask, surrogate, zero).sum() / denom
    clip_frac = (((ratio - 1).abs() > clip_eps) & mask).sum() / denom
    if ref_logp is not None and kl_coef > 0:
        kl = torch.where(mask, k3_kl(logp, torch.where(mask, ref_logp, logp.detach())), zero).sum() / denom
    else:
        kl = zero
    return LossParts(policy_loss + kl_coef * kl, policy_loss.detach(), kl.detach(), clip_frac.detach(), mask.sum())
