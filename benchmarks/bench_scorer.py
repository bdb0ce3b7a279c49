"""Scorer costs: hook overhead, fused reference+probe pass, truncation without KL, token-budget batching.

    .venv/bin/python benchmarks/bench_scorer.py [--layers 8 --hidden 512 --seqs 64 --repeats 15]

Every figure is a ratio measured in this one run, with cases interleaved (A B A B) so machine noise
hits each alike. Targets: hooked / unhooked within 2%; fused probe+reference / reference-only close
to 1; truncated / full close to (probe layer + 1) / layers.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import torch
from _common import interleaved, random_llama, ratio, summary


def rollouts(n: int, vocab: int, seed: int) -> pa.Table:
    from pipeline.data.schema import rollout_table

    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(4, vocab) for _ in range(rng.randint(8, 24))] for _ in range(n)]
    comps = [[rng.randrange(4, vocab) for _ in range(rng.randint(4, 48))] for _ in range(n)]
    return rollout_table(prompts, comps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from probes.probe import LinearProbe

    tmp = Path(tempfile.gettempdir()) / f"probe-rl-bench-llama-{args.layers}x{args.hidden}"
    model_dir = str(random_llama(tmp, args.layers, args.hidden))
    mid = args.layers // 2
    probe_dir = Path(tempfile.mkdtemp())
    LinearProbe("p", mid, torch.randn(args.hidden) * 0.05, torch.zeros(1)).save(probe_dir / "p")
    probe = [(str(probe_dir / "p"), None)]
    table = rollouts(args.seqs, 1024, 0)
    print(f"model: random Llama, {args.layers} layers, hidden {args.hidden}; {args.seqs} sequences, "
          f"{sum(len(p) + len(c) for p, c in zip(table['prompt_ids'].to_pylist(), table['completion_ids'].to_pylist(), strict=True))} tokens; "
          f"probe at layer {mid}; {args.threads} threads")
    _hook_overhead(model_dir, table, mid, args.repeats)
    _scorer_passes(model_dir, probe, table, (mid + 1) / args.layers, args.repeats)
    _batching(model_dir, probe, table, args.repeats)


def _hook_overhead(model_dir: str, table, layer: int, repeats: int) -> None:
    """1. Hook overhead on the same padded batch: identical forward with and without the capture."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.batching import pack
    from pipeline.data.logprobs import token_logprobs
    from probes.hooks import capture_residuals

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = pack(table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist())

    def plain():
        with torch.no_grad():
            return token_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.input_ids)

    def hooked():
        with torch.no_grad(), capture_residuals(model, [layer]):
            return token_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.input_ids)

    t = interleaved({"unhooked": plain, "hooked": hooked}, repeats)
    r, spread = ratio(t["hooked"], t["unhooked"])
    print(f"\n[hook overhead] unhooked {summary(t['unhooked'])}\n                hooked   {summary(t['hooked'])}")
    print(f"  hooked / unhooked = {r:.4f} ± {spread:.4f}   (target <= 1.02)")


def _scorer_passes(model_dir: str, probe, table, expected: float, repeats: int) -> None:
    """2. Scorer end to end: reference only (plain RLHF with KL) vs reference + probe in one fused pass, and
    without KL: probe on a pass truncated after its layer vs a full pass (`expected`: layers used / total)."""
    from actors.scorer import Scorer
    from pipeline.config import ScorerConfig

    cfg = ScorerConfig(token_budget=1 << 20, batch_size=1 << 20)
    ref_only = Scorer(model_path=model_dir, probe_paths=[], cfg=cfg, compute_ref=True)
    fused = Scorer(model_path=model_dir, probe_paths=probe, cfg=cfg, compute_ref=True)
    cut = Scorer(model_path=model_dir, probe_paths=probe, cfg=cfg, compute_ref=False)
    t = interleaved({"ref": lambda: ref_only.score(table), "fused": lambda: fused.score(table),
                     "truncated": lambda: cut.score(table)}, repeats)
    r, spread = ratio(t["fused"], t["ref"])
    r_cut, spread_cut = ratio(t["truncated"], t["ref"])
    print(f"\n[scorer] reference only     {summary(t['ref'])}\n         reference + probe {summary(t['fused'])}"
          f"\n         probe, truncated  {summary(t['truncated'])}")
    print(f"  fused / reference-only = {r:.4f} ± {spread:.4f}   (the probe's cost on top of a KL pass; target ~1)")
    print(f"  truncated / full pass  = {r_cut:.4f} ± {spread_cut:.4f}   (layers used / total = {expected:.3f}; "
          "the rest is embedding, no LM head, Arrow)")


def _batching(model_dir: str, probe, table, repeats: int) -> None:
    """3. Token-budget batching vs fixed-size batches in arrival order."""
    from actors.scorer import Scorer
    from pipeline.config import ScorerConfig
    from pipeline.data.batching import padding_waste, token_budget_batches

    lengths = [len(p) + len(c) for p, c in zip(table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist(), strict=True)]
    fixed_rows = 16
    fixed = [list(range(i, min(i + fixed_rows, len(lengths)))) for i in range(0, len(lengths), fixed_rows)]
    budget = max(lengths) * fixed_rows
    packed = token_budget_batches(lengths, budget, 1 << 20)
    by_budget = Scorer(model_path=model_dir, probe_paths=probe, cfg=ScorerConfig(token_budget=budget, batch_size=1 << 20), compute_ref=True)
    by_rows = Scorer(model_path=model_dir, probe_paths=probe, cfg=ScorerConfig(token_budget=1 << 30, batch_size=fixed_rows), compute_ref=True)
    t = interleaved({"fixed": lambda: _in_order(by_rows, table), "budget": lambda: by_budget.score(table)}, repeats)
    r, spread = ratio(t["budget"], t["fixed"])
    print(f"\n[batching] fixed {fixed_rows} rows in arrival order: padding waste {padding_waste(lengths, fixed):.1%}, "
          f"{summary(t['fixed'])}")
    print(f"           token budget {budget} (length-sorted):   padding waste {padding_waste(lengths, packed):.1%}, "
          f"{summary(t['budget'])}")
    print(f"  budget / fixed time = {r:.4f} ± {spread:.4f}")


def _in_order(scorer, table):
    """Score fixed-size row chunks in arrival order (what a scorer without length sorting does)."""
    rows = scorer.cfg.batch_size
    return [scorer._score_batch(table["prompt_ids"].to_pylist()[i : i + rows],
                                table["completion_ids"].to_pylist()[i : i + rows])
            for i in range(0, table.num_rows, rows)]


if __name__ == "__main__":
    main()
