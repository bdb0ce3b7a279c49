"""Helpers shared by the benchmarks: a random Llama of a chosen size, interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def random_llama(path: Path, layers: int, hidden: int, vocab: int = 1024, seed: int = 0) -> Path:
    """Save a randomly initialised Llama (head_dim 64) with the toy tokenizer, once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.toy import build_tokenizer

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      head_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
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
