"""Packing prompt + completion token lists into padded tensors, shared by scorers and the learner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (B, T) 1 where input_ids holds a completion token
    prompt_lens: list[int]  # (B,)
    completion_lens: list[int]  # (B,)

    def completion_values(self, per_position: torch.Tensor, shift: int = 0) -> list[torch.Tensor]:
        """Cut (B, T') per-position values down to each row's completion tokens.

        shift=1 for values indexed by predicted position (log-probs from logits[:, :-1] sit one left).
        """
        return [
            per_position[i, p - shift : p - shift + c]
            for i, (p, c) in enumerate(zip(self.prompt_lens, self.completion_lens, strict=True))
        ]

    def completion_targets(self, values: list[list[float]], fill: float = 0.0) -> torch.Tensor:
        """Per-completion-token values (B ragged lists) laid out as (B, T-1) aligned with shifted log-probs."""
        out = torch.full((self.input_ids.shape[0], self.input_ids.shape[1] - 1), fill, dtype=torch.float32)
        for i, (p, c) in enumerate(zip(self.prompt_lens, self.completion_lens, strict=True)):
            if c:
                out[i, p - 1 : p - 1 + c] = torch.as_tensor(values[i], dtype=torch.float32)
        return out


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int = 0) -> PackedBatch:
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, p, _c) in enumerate(zip(rows, prompt_ids, completion_ids, strict=True)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
        comp[i, len(p) : len(r)] = True
        assert len(p) > 0, "a prompt needs at least one token (BOS)"
    return PackedBatch(ids, attn, comp, [len(p) for p in prompt_ids], [len(c) for c in completion_ids])


def token_budget_batches(lengths: list[int], token_budget: int, max_rows: int) -> list[list[int]]:
    """Row indices grouped into batches whose padded size (rows x longest) stays within `token_budget`.

    Rows are sorted by length first, so each batch holds sequences of similar length and little padding;
    a single row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max(lengths[i], max((lengths[j] for j in current), default=0))
        if current and (longest * (len(current) + 1) > token_budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of the padded tokens of these batches that are padding."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded if padded else 0.0


def finite_rows(table: pa.Table, columns: list[str]) -> np.ndarray:
    """(N,) bool numpy: rows whose every value in each list<float> column is finite (an empty list counts as finite).

    A NaN or inf reference or behaviour log-prob in one row must cost that row its gradient, not the batch its step."""
    import numpy as np
    import pyarrow.compute as pc

    ok = np.ones(table.num_rows, dtype=bool)
    for name in columns:
        col = table.column(name)
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if flat.size == 0:
            continue
        bad = ~np.isfinite(flat)
        if bad.any():
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
            row_of = np.repeat(np.arange(table.num_rows), np.nan_to_num(lengths, nan=0).astype(np.int64))
            ok[np.unique(row_of[bad])] = False
    return ok
