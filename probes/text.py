"""A monitor that reads only the completion's text: the control that says what a probe adds over the output.

A probe reads the model's activations; a hack that shows in the text lets a probe look better than it is (a
classifier on the output alone may catch it as well). `TextMonitor` is the baseline the literature asks for: an
L2 logistic regression on the completion's bag of tokens (how often each token id occurs in it, the EOS the
generator emits included), fitted on the same labelled completions and the same prompt-grouped split as the probe
it is compared with, so the two held-out AUROCs are of the same rows. Its score is sigmoid(b + sum_t w[id_t]): one
number per completion, read in the rewarder from the token ids alone (no model).

Files: `<stem>.safetensors` (`weight` (V,) over the tokenizer's ids, `bias` (1,)) plus `<stem>.json`
(`kind = "text"`, `name`, `vocab_size`, `notes`); never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from probes.toolkit import Labelled

FORMAT_VERSION = 1


@dataclass
class TextMonitor:
    name: str
    weight: torch.Tensor  # (V,): the logit each occurrence of a token id adds
    bias: torch.Tensor  # (1,)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def scores(self, completion_ids: list[list[int]]) -> np.ndarray:
        """One probability per completion (an empty one scores sigmoid(bias)). A token the fit never saw weighs 0,
        also one past the tokenizer's ids (a model's embedding may have more rows than its tokenizer has tokens, and
        a policy can sample them)."""
        w = self.weight.double().numpy()
        out = np.empty(len(completion_ids), dtype=np.float64)
        for i, ids in enumerate(completion_ids):
            ids = np.asarray(ids, dtype=np.int64)
            out[i] = w[ids[ids < len(w)]].sum() + float(self.bias)
        return (1.0 / (1.0 + np.exp(-out))).astype(np.float32)

    def save(self, stem: str | Path) -> Path:
        from safetensors.torch import save_file

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().reshape(1)},
                  str(stem.with_suffix(".safetensors")))
        meta = {"format_version": FORMAT_VERSION, "kind": "text", "name": self.name, "vocab_size": self.vocab_size,
                "notes": self.notes}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return stem


def load_text_monitor(path: str | Path) -> TextMonitor:
    """Load and validate a text monitor; a malformed file gets a message that says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from probes.probe import PICKLE_SUFFIXES, read_files

    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"text monitor {path}: monitors are never unpickled; save it as safetensors "
                         "(probes.text.TextMonitor.save)")
    meta_path, tensor_path, meta = read_files(path, "text monitor")
    if not isinstance(meta, dict) or meta.get("kind") != "text" or not isinstance(meta.get("name"), str) \
            or not isinstance(meta.get("vocab_size"), int):
        raise ValueError(f"text monitor metadata {meta_path} must be a JSON object with kind = \"text\", a name and "
                         "an integer vocab_size")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"text monitor tensors {tensor_path} are not a readable safetensors file: {e}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.ndim != 1 or bias.numel() != 1 or weight.shape[0] != meta["vocab_size"]:
        raise ValueError(f"text monitor tensors {tensor_path} must hold `weight` of shape ({meta['vocab_size']},) "
                         "and `bias` of shape (1,)")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError(f"text monitor tensors {tensor_path} contain NaN or inf")
    return TextMonitor(meta["name"], weight.float(), bias.float().reshape(1), meta.get("notes", {}))


def token_counts(completion_ids: list[list[int]], columns: np.ndarray) -> torch.Tensor:
    """(N, len(columns)) counts of each of the token ids `columns` (sorted) in each completion."""
    x = np.zeros((len(completion_ids), len(columns)), dtype=np.float64)
    for i, ids in enumerate(completion_ids):
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(columns, ids)
        hit = (pos < len(columns)) & (columns[np.minimum(pos, len(columns) - 1)] == ids)
        np.add.at(x[i], pos[hit], 1.0)
    return torch.from_numpy(x)


def fit_text_monitor(data: Labelled, tokenizer: PreTrainedTokenizerBase, name: str, held_out_frac: float = 0.2,
                     seed: int = 0, l2: float = 1e-3) -> tuple[TextMonitor, dict[str, float]]:
    """Fit on the train side of `split_by_prompt(data, held_out_frac, seed)` (the split `train_probes` uses with
    the same arguments) over the completions' token ids as `probes.toolkit.encode` makes them; metrics on the held-out
    side, as a probe's."""
    from probes.fit import fit_logistic
    from probes.toolkit import encode, probe_metrics, split_by_prompt

    train, test = split_by_prompt(data, held_out_frac, seed)
    _, c_ids = encode(tokenizer, data.prompts, data.completions)
    columns = np.unique(np.concatenate([np.asarray(c_ids[i], dtype=np.int64) for i in train]))
    fit = fit_logistic(token_counts([c_ids[i] for i in train], columns),
                       torch.tensor([float(data.labels[i]) for i in train]), l2=l2, balance=True)
    vocab = max(len(tokenizer), int(columns.max()) + 1)
    weight = torch.zeros(vocab)
    weight[torch.from_numpy(columns)] = fit.weight.float()
    monitor = TextMonitor(name, weight, fit.bias.float().reshape(1))
    metrics = probe_metrics(torch.from_numpy(monitor.scores([c_ids[i] for i in test]).astype(np.float64)),
                            torch.tensor([float(data.labels[i]) for i in test]))
    monitor.notes = {"held_out": metrics, "num_train_sequences": len(train), "l2": l2, "tokens_seen": len(columns),
                     "fit": "logistic regression on the completion's token counts, labels per sequence",
                     "class_balanced": True}
    return monitor, metrics
