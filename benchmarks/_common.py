"""Helpers shared by the benchmarks: a random Llama of a chosen size, interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def random_llama(path: Path, layers: int, hidden: int, vocab: int = 1024, seed: int = 0) -> Path:
    """Save a randomly initialised Llama (head_dim 64) with the toy tokenizer, once."""
    from pipeline.analysis.cost import Arch
    from pipeline.worlds.toy import build_tokenizer

    arch = Arch(f"{layers} x {hidden}", layers, hidden, int(hidden * 8 / 3) // 64 * 64, vocab, hidden // 64,
                hidden // 64, 64)
    return random_llama_of(arch, path, seed=seed, tokenizer=build_tokenizer())


def random_llama_of(arch, path: Path, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                    tokenizer=None) -> Path:
    """Save a randomly initialised Llama of `arch`'s shape (a `pipeline.analysis.cost.Arch`) at `path`, once: built on
    `device` (a 7B model takes seconds on a GPU), written whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "config.json").is_file():
        return path
    cfg = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.ffn,
                      num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                      head_dim=arch.head_dim, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each case `repeats` times, cycling A B C A B C so machine noise hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:8.2f} ms  (min {min(times) * 1e3:.2f}, n={len(times)})"


def ratio(a: list[float], b: list[float]) -> tuple[float, float]:
    """Median of per-round ratios a/b and their spread (interquartile half-range)."""
    rs = sorted(x / y for x, y in zip(a, b, strict=True))
    q = statistics.quantiles(rs, n=4) if len(rs) >= 4 else [rs[0], statistics.median(rs), rs[-1]]
    return statistics.median(rs), (q[2] - q[0]) / 2
