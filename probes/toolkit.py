"""Training and evaluating probes on labelled completions: what `probe-rl probe train|eval` run.

A labelled dataset is Parquet or JSONL with `prompt` (text), `completion` (text) and `label` (0/1).
Activations come from one forward pass per batch with scoped hooks on every requested layer. Each
completion token carries its sequence's label when fitting; held-out metrics are computed on the
aggregated score, exactly as scorers compute it during RL. The held-out split is by prompt, so a
probe cannot score well by memorising prompts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from probes.fit import auroc, fit_logistic
from probes.probe import LinearProbe, aggregate, check_aggregation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Labelled:
    prompts: list[str]
    completions: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: list[int]) -> Labelled:
        return Labelled([self.prompts[i] for i in rows], [self.completions[i] for i in rows],
                        [self.labels[i] for i in rows])


def save_labelled(data: Labelled, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "completion": c, "label": y} for p, c, y in zip(data.prompts, data.completions, data.labels, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str], append_eos: bool = True,
           prompt_ids: list[list[int]] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts (with the tokenizer's special tokens; or `prompt_ids`, already encoded the way the run
    encodes its prompts, e.g. through a chat template) and of completions (+ EOS, as generators emit it)."""
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} encoded prompts for {len(prompts)} prompts")
    p_ids = [list(p) for p in prompt_ids] if prompt_ids is not None else [tokenizer(p)["input_ids"] for p in prompts]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in completions]
    return p_ids, c_ids


def completion_activations(model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], layers: list[int],
                           batch_size: int = 64, pad_id: int = 0) -> dict[int, list[torch.Tensor]]:
    """Per layer, per row: the residual stream at the completion tokens (T_c, H). One pass per batch."""
    from probes.hooks import capture_residuals

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = next(model.parameters()).device
    for lo in range(0, len(prompt_ids), batch_size):
        prompts, comps = prompt_ids[lo : lo + batch_size], completion_ids[lo : lo + batch_size]
        rows = [list(p) + list(c) for p, c in zip(prompts, comps, strict=True)]
        ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right-padded, as the scorer packs them
            ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
        with torch.no_grad(), capture_residuals(model, layers, stop_after=max(layers)) as cap:
            model(input_ids=ids.to(device), attention_mask=attn.to(device))
        for layer in layers:
            res = cap.residuals[layer]
            out[layer] += [res[i, len(p) : len(p) + len(c)].float().cpu()
                           for i, (p, c) in enumerate(zip(prompts, comps, strict=True))]
    return out


def score_sequences(probe: LinearProbe, acts: list[torch.Tensor], aggregation: str | None = None) -> torch.Tensor:
    """Aggregated probe score per sequence from ragged (T_c, H) activations: (N,)."""
    width = max(1, max(len(a) for a in acts))
    hidden = torch.zeros(len(acts), width, probe.hidden_size)
    mask = torch.zeros(len(acts), width, dtype=torch.bool)
    for i, a in enumerate(acts):
        hidden[i, : len(a)] = a
        mask[i, : len(a)] = True
    return aggregate(probe.token_scores(hidden), mask, aggregation or probe.aggregation)


def recall_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float) -> float:
    """Fraction of positives flagged at the strictest threshold that flags at most `fpr` of negatives."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    return recall_against(scores[~labels], scores[labels], fpr)


def threshold_at_fpr(negatives: torch.Tensor, fpr: float) -> float:
    """The strictest threshold (flag: score > threshold) that flags at most `fpr` of `negatives`; nan without any."""
    neg = torch.sort(negatives.double().flatten(), descending=True).values
    if len(neg) == 0:
        return float("nan")
    allowed = int(fpr * len(neg))  # negatives that may score above the threshold
    return float(neg[allowed]) if allowed < len(neg) else -float("inf")


def recall_against(negatives: torch.Tensor, positives: torch.Tensor, fpr: float) -> float:
    """Share of `positives` above the threshold set at `fpr` on `negatives` (which may come from another set: a
    defender recalibrating on the honest completions of the policy they deploy)."""
    threshold = threshold_at_fpr(negatives, fpr)
    if len(positives) == 0 or math.isnan(threshold):
        return float("nan")
    return float((positives.double().flatten() > threshold).double().mean())


def probe_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    finite = torch.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    return {"auroc": auroc(scores, labels), "recall_at_1pct_fpr": recall_at_fpr(scores, labels, 0.01),
            "recall_at_5pct_fpr": recall_at_fpr(scores, labels, 0.05), "num": int(len(labels)),
            "num_positive": int(labels.sum())}


def split_by_prompt(data: Labelled, held_out_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, held out); all rows of one prompt fall on the same side."""
    prompts = sorted(set(data.prompts))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, int(round(held_out_frac * len(prompts))))])
    train = [i for i, p in enumerate(data.prompts) if p not in held]
    test = [i for i, p in enumerate(data.prompts) if p in held]
    if not train or not test:
        raise ValueError(f"cannot split {len(prompts)} distinct prompts into train and held-out parts")
    return train, test


def fit_probe(acts: list[torch.Tensor], labels: list[int], name: str, layer: int, aggregation: str = "mean",
              l2: float = 1e-3, balance: bool = True) -> LinearProbe:
    """Logistic regression on completion tokens, each labelled with its sequence's label."""
    check_aggregation(aggregation)
    rows = [a for a in acts if len(a)]
    ys = [y for a, y in zip(acts, labels, strict=True) if len(a)]
    x = torch.cat(rows)
    y = torch.cat([torch.full((len(a),), float(v)) for a, v in zip(rows, ys, strict=True)])
    fit = fit_logistic(x, y, l2=l2, balance=balance)
    return LinearProbe(name, layer, fit.weight, fit.bias, aggregation)


def train_probes(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Labelled, layers: list[int], name: str, aggregation: str = "mean",
                 l2: float = 1e-3, held_out_frac: float = 0.2, seed: int = 0, balance: bool = True,
                 batch_size: int = 64, prompt_ids: list[list[int]] | None = None,
                 ) -> list[tuple[LinearProbe, dict[str, float]]]:
    """One probe per layer, fitted on the train split; each with its held-out metrics in `notes`. `prompt_ids`: the
    prompts encoded as the run encodes them (a chat template); None: their raw text."""
    train, test = split_by_prompt(data, held_out_frac, seed)
    p_ids, c_ids = encode(tokenizer, data.prompts, data.completions, prompt_ids=prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts = completion_activations(model, p_ids, c_ids, layers, batch_size, pad)
    labels = torch.tensor(data.labels, dtype=torch.float32)
    results = []
    for layer in layers:
        probe_name = name if len(layers) == 1 else f"{name}_l{layer}"
        probe = fit_probe([acts[layer][i] for i in train], [data.labels[i] for i in train], probe_name, layer,
                          aggregation, l2, balance)
        metrics = probe_metrics(score_sequences(probe, [acts[layer][i] for i in test]), labels[test])
        probe.notes = {"held_out": metrics, "num_train_sequences": len(train), "l2": l2,
                       "fit": "logistic regression on completion-token residuals, labels per sequence",
                       "class_balanced": balance}
        results.append((probe, metrics))
    return results


def evaluate_probes(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Labelled, probes: list[LinearProbe],
                    batch_size: int = 64) -> list[dict[str, float]]:
    layers = sorted({p.layer for p in probes})
    p_ids, c_ids = encode(tokenizer, data.prompts, data.completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts = completion_activations(model, p_ids, c_ids, layers, batch_size, pad)
    labels = torch.tensor(data.labels, dtype=torch.float32)
    return [probe_metrics(score_sequences(p, acts[p.layer]), labels) for p in probes]
