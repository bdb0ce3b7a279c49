"""Fitting logistic-regression probes and the metrics that judge them. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FitResult:
    weight: torch.Tensor  # (H,) in the original (unstandardised) activation space
    bias: torch.Tensor  # (1,)
    train_loss: float


def fit_logistic(
    x: torch.Tensor,  # (N, H) features
    y: torch.Tensor,  # (N,) labels in {0, 1}
    l2: float = 1e-3,
    balance: bool = True,
    max_iter: int = 200,
) -> FitResult:
    """L2-regularised logistic regression by L-BFGS on standardised features.

    With `balance`, each class carries half the loss whatever its frequency. The returned weights
    act on raw features (standardisation folded in).
    """
    x = x.double()
    y = y.double()
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("a probe needs examples of both classes; all labels are equal")
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    pos = y.mean()
    sample_w = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)) if balance else torch.ones_like(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w + b
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=sample_w, reduction="mean")
        loss = nll + l2 * (w * w).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    with torch.no_grad():
        w_raw = w / sd
        b_raw = b - (mu * w_raw).sum()
    return FitResult(w_raw.float().detach(), b_raw.float().detach(), float(loss.detach()))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count half."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # rank-based (Mann-Whitney U) with average ranks for ties
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    i, n = 0, len(scores)
    ranks_sorted = torch.empty_like(scores)
    while i < n:
        j = i
        while j + 1 < n and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks_sorted[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    ranks[order] = ranks_sorted
    u = ranks[labels].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))
