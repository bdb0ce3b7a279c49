"""Linear probes: file format, scoring and aggregation over completion tokens.

A probe is `<stem>.safetensors` (tensors `weight` (H,) and `bias` (1,)) plus `<stem>.json`
(name, layer, hidden_size, aggregation, and free-form training notes). Files are parsed, never
unpickled. Scores are probabilities: sigmoid(h . w + b) per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probes.names import check_aggregation

Aggregation = str  # "mean", "max", "last", or "window:K" (max over rolling means of K tokens)
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "last", "window:K")
FORMAT_VERSION = 1


@dataclass
class LinearProbe:
    name: str
    layer: int  # 0-based decoder block whose output (residual stream) the probe reads
    weight: torch.Tensor  # (H,)
    bias: torch.Tensor  # (1,)
    aggregation: Aggregation = "mean"
    notes: dict[str, Any] = field(default_factory=dict)  # training provenance and held-out metrics

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) residuals -> (B, T) probabilities."""
        w = self.weight.to(device=hidden.device, dtype=torch.float32)
        b = self.bias.to(device=hidden.device, dtype=torch.float32)
        return torch.sigmoid(hidden.float() @ w + b)

    def check_fits(self, num_layers: int, hidden_size: int, model_name: str = "the model") -> None:
        """Refuse a probe that cannot read this model, naming both numbers."""
        if self.hidden_size != hidden_size:
            raise ValueError(
                f"probe {self.name!r} has hidden size {self.hidden_size} but {model_name} has hidden size "
                f"{hidden_size}: the probe was trained on a different model"
            )
        if not 0 <= self.layer < num_layers:
            raise ValueError(
                f"probe {self.name!r} reads layer {self.layer} but {model_name} has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )

    def save(self, stem: str | Path) -> Path:
        from safetensors.torch import save_file

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().reshape(1)}
        save_file(tensors, str(stem.with_suffix(".safetensors")))
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "layer": self.layer,
            "hidden_size": self.hidden_size,
            "aggregation": self.aggregation,
            "notes": self.notes,
        }
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return stem


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".npy")


def _probe_stem(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def read_files(path: str | Path, what: str) -> tuple[Path, Path, object]:
    """(<stem>.json, <stem>.safetensors, the parsed JSON) of a saved probe or monitor, each missing file or bad JSON
    a message naming it."""
    stem = _probe_stem(path)
    meta_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise ValueError(f"{what} file {p} does not exist (a {what} is <stem>.json plus <stem>.safetensors)")
    try:
        return meta_path, tensor_path, json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} metadata {meta_path} is not valid JSON: {e}") from None


def load_probe(path: str | Path) -> LinearProbe:
    """Load and validate a probe; every malformed file gets a message that says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"probe {path}: probes are never unpickled (a pickle runs code when loaded); save it as "
                         "safetensors: <stem>.safetensors with `weight` (H,) and `bias` (1,), plus <stem>.json with "
                         "name, layer, hidden_size and aggregation (probes.probe.LinearProbe.save writes both)")
    meta_path, tensor_path, meta = read_files(path, "probe")
    required = {"name": str, "layer": int, "hidden_size": int, "aggregation": str}
    if not isinstance(meta, dict):
        raise ValueError(f"probe metadata {meta_path} must be a JSON object with keys {sorted(required)}")
    wrong = [f"{key!r} must be {'an' if typ is int else 'a'} {typ.__name__}"
             + (" (missing)" if key not in meta else f", got {meta[key]!r}") for key, typ in required.items() if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool)]
    if wrong:
        raise ValueError(f"probe metadata {meta_path}: " + "; ".join(wrong))
    try:
        check_aggregation(meta["aggregation"])
    except ValueError as e:
        raise ValueError(f"probe metadata {meta_path}: {e}") from None
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"probe tensors {tensor_path} are not a readable safetensors file: {e}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.ndim != 1 or bias.numel() != 1:
        raise ValueError(f"probe tensors {tensor_path} must hold `weight` of shape (H,) and `bias` of shape (1,)")
    if weight.shape[0] != meta["hidden_size"]:
        raise ValueError(
            f"probe {tensor_path}: weight has {weight.shape[0]} entries but its metadata says hidden_size "
            f"{meta['hidden_size']}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError(f"probe tensors {tensor_path} contain NaN or inf")
    return LinearProbe(
        name=meta["name"], layer=meta["layer"], weight=weight.float(), bias=bias.float().reshape(1),
        aggregation=meta["aggregation"], notes=meta.get("notes", {}),
    )


def unit_direction(weight: torch.Tensor) -> torch.Tensor:
    """The probe's direction u = w / |w| (H,); a zero weight has none."""
    norm = weight.float().norm()
    if not norm > 0:
        raise ValueError("a probe with a zero weight has no direction")
    return weight.float() / norm


def project_out(hidden: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h - (h.u)u for each position: (..., H), (H,) unit -> (..., H). What is left has no component along u and
    every component orthogonal to u unchanged."""
    u = u.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ u)[..., None] * u


def probe_loss(probe: LinearProbe, hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sum over `rows` (B,) bool of the probe's aggregated score (its own aggregation over the masked completion
    tokens) on `hidden` (B, T, H), differentiable in `hidden`. Rows with no masked token add nothing."""
    scores = aggregate(probe.token_scores(hidden), mask, probe.aggregation)  # (B,)
    keep = rows & torch.isfinite(scores)
    return torch.where(keep, scores, torch.zeros_like(scores)).sum()


def aggregate(scores: torch.Tensor, mask: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Aggregate per-token scores over the masked (completion) tokens: (B, T), (B, T) -> (B,).

    mean, max, last; or window:K, the max over every run of K consecutive masked tokens of their mean
    (a row with fewer than K tokens gets its mean): harder to dilute than a mean, smoother than a max.
    A row with no masked token gets NaN: there is nothing to score.
    """
    check_aggregation(how)
    mask = mask.bool()
    count = mask.sum(-1)
    if how == "mean":
        out = (scores * mask).sum(-1) / count.clamp(min=1)
    elif how == "max":
        out = scores.masked_fill(~mask, -math.inf).max(-1).values
    elif how == "last":
        positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
        last = positions.masked_fill(~mask, -1).max(-1).values.clamp(min=0)
        out = scores.gather(-1, last[:, None]).squeeze(-1)
    else:
        out = _window_max(scores, mask, int(how.split(":")[1]))
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


def aggregate_ragged(rows: list[list[float]], how: Aggregation) -> list[float]:
    """`aggregate` over per-token scores of uneven lengths (one list per row); an empty row gets NaN."""
    width = max([len(r) for r in rows] + [1])
    scores = torch.zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        scores[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32)
        mask[i, :len(r)] = True
    return aggregate(scores, mask, how).tolist()


def _window_max(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    # Compact each row's masked tokens to the left, then take rolling sums with a cumulative sum.
    count = mask.sum(-1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    packed = scores.gather(-1, order) * (torch.arange(scores.shape[-1], device=scores.device) < count[:, None])
    csum = torch.nn.functional.pad(packed.cumsum(-1), (1, 0))
    width = scores.shape[-1]
    if k > width:
        return packed.sum(-1) / count.clamp(min=1)
    window = (csum[:, k:] - csum[:, :-k]) / k  # (B, T-K+1): mean of tokens [j, j+K)
    valid = torch.arange(window.shape[-1], device=scores.device) <= (count[:, None] - k)
    best = window.masked_fill(~valid, -math.inf).max(-1).values
    short = count < k
    return torch.where(short, packed.sum(-1) / count.clamp(min=1), best)
