"""Scorer and learner throughput at real model shapes, beside what `probe-rl cost` predicts. Meant for a GPU.

    python benchmarks/bench_gpu.py                                    # 0.5b and 7b, bf16, on cuda
    python benchmarks/bench_gpu.py --model 0.5b --seqs 16 --tokens 2048 --out docs/results/gpu
    python benchmarks/bench_gpu.py --model tiny --device cpu --dtype float32 --seqs 4 --tokens 96   # CPU check

Random-init Llama-shaped models (the shapes in `pipeline.analysis.cost.PRESETS`), built on the device and saved once under
the temp folder: nothing is downloaded. Needs torch and transformers only (no Ray, vLLM or DeepSpeed), so it runs
on a bare GPU machine. Per model, cases interleaved (A B C A B C), the device synchronised around each:

- the scorer (`actors.scorer.Scorer.score`, the code the scorer actor runs): reference log-probs only (plain
  RLHF with KL), reference + probe in one fused pass, and the probe alone on a pass truncated after its layer
  (no KL);
- the model's forward pass (chunked log-probs) with and without the probe's forward hook;
- a learner micro-step: forward and backward of the learner's loss (`model_logprobs` + `ppo_loss`) on one
  micro-batch, gradient checkpointing on; the optimizer step (once a step, after the micro-steps) is not in it.

Each case prints tokens/s, peak GPU memory, the FLOPs per token `pipeline.analysis.cost` counts for it, the tokens/s that
count predicts at the cost model's utilisation (scorer 40%, learner 35% of --peak-tflops), and the share of peak
reached. The cases are checked against each other: the fused pass's reference log-probs must equal the
reference-only pass's, and its probe scores the truncated pass's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved, random_llama_of

from pipeline.analysis.cost import PEAK_FLOPS, PRESETS, Arch, Utilisation, forward_flops_per_token

TINY = Arch("tiny (a CPU check of this script)", 4, 128, 384, 1024, 2, 2, 64)
MODELS = {"tiny": TINY, **{k: PRESETS[k] for k in ("0.5b", "7b", "70b")}}


def build_model(key: str, arch: Arch, dtype: str, device: str) -> Path:
    """A random-init Llama of `arch`'s shape saved under the temp folder (once; reused after)."""
    path = Path(tempfile.gettempdir()) / f"probe-rl-bench-{key}-{dtype}"
    if not (path / "config.json").is_file():
        start = time.perf_counter()
        random_llama_of(arch, path, dtype, device)
        print(f"built {arch.name}: {arch.params / 1e6:,.1f}M parameters in {time.perf_counter() - start:.0f} s "
              f"-> {path}", flush=True)
        _free(device)
    return path


def rollouts(seqs: int, tokens: int, vocab: int):
    """`seqs` rows of `tokens` tokens (a quarter prompt, the rest completion), random ids."""

    from pipeline.data.schema import rollout_table

    gen = torch.Generator().manual_seed(0)
    prompt_len = max(1, tokens // 4)
    ids = torch.randint(4, vocab, (seqs, tokens), generator=gen).tolist()
    prompts, comps = [r[:prompt_len] for r in ids], [r[prompt_len:] for r in ids]
    return rollout_table(prompts, comps)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: str, fn) -> float:
    """Peak GPU memory (GiB) of one untimed call of `fn`; NaN off GPU."""
    if device != "cuda":
        fn()
        return float("nan")
    _free(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _timed(cases: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each case over `repeats` rounds, A B C A B C after a warm-up round, each call's device
    work finished inside its own timing."""
    synced = {name: (lambda fn=fn: (fn(), _sync(device))) for name, fn in cases.items()}
    return {name: statistics.median(t) for name, t in interleaved(synced, repeats).items()}


SCORER_CASES = ("scorer: reference only", "scorer: reference + probe (fused)", "scorer: probe only, truncated")
HOOK_CASES = ("forward: unhooked", "forward: hooked")
LEARNER_CASE = "learner: micro-step (forward + backward)"


def scorer_cases(path: str, probe_stem: Path, mid: int, table, args: argparse.Namespace):
    """Seconds and peak GiB of the scorer's three uses of one loaded model, and of its forward hooked and not."""
    from actors.scorer import Scorer
    from pipeline.config import ScorerConfig
    from pipeline.data.batching import pack
    from pipeline.data.logprobs import model_logprobs
    from pipeline.data.schema import scored_schema
    from probes.hooks import capture_residuals

    device = args.device
    cfg = ScorerConfig(num_gpus=1 if device == "cuda" else 0, num_cpus=args.threads, token_budget=args.token_budget,
                       batch_size=1 << 20)
    fused = Scorer(model_path=path, probe_paths=[(str(probe_stem), None)], cfg=cfg, compute_ref=True, dtype=args.dtype)

    def variant(probes: list, compute_ref: bool) -> Scorer:
        v = copy.copy(fused)  # shares the loaded model
        v.probes, v.compute_ref, v.schema = probes, compute_ref, scored_schema([p.name for p in probes])
        return v

    scorers = dict(zip(SCORER_CASES, (variant([], True), fused, variant(fused.probes, False)), strict=True))
    out = {name: s.score(table)[0] for name, s in scorers.items()}
    ref_diff = _max_diff(out[SCORER_CASES[1]]["ref_logprobs"], out[SCORER_CASES[0]]["ref_logprobs"])
    probe_diff = _max_diff(out[SCORER_CASES[1]]["probe/probe/tokens"], out[SCORER_CASES[2]]["probe/probe/tokens"])
    print(f"  fused vs reference-only log-probs: max |diff| {ref_diff:.2e}; fused vs truncated probe scores: "
          f"{probe_diff:.2e}", flush=True)
    if ref_diff > args.tolerance or probe_diff > args.tolerance:
        raise SystemExit(f"bench_gpu: the scorer's cases disagree beyond {args.tolerance} (see above)")
    model = fused.model
    batch = pack(table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist())
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)

    def unhooked():
        with torch.no_grad():
            model_logprobs(model, ids, attn)

    def hooked():
        with torch.no_grad(), capture_residuals(model, [mid]):
            model_logprobs(model, ids, attn)

    cases = {name: (lambda s=s: s.score(table)) for name, s in scorers.items()}
    cases |= dict(zip(HOOK_CASES, (unhooked, hooked), strict=True))
    peaks = {name: _peak_gib(device, fn) for name, fn in cases.items()}
    return _timed(cases, args.repeats, device), peaks


def learner_case(path: str, table, args: argparse.Namespace):
    """Seconds and peak GiB of one learner micro-step: the learner's loss, forward and backward."""
    from transformers import AutoModelForCausalLM

    from learner.losses import ppo_loss
    from pipeline.data.batching import pack
    from pipeline.data.logprobs import model_logprobs

    device = args.device
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
    policy.config.use_cache = False
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    rows = slice(0, args.micro_batch)
    micro = pack(table["prompt_ids"].to_pylist()[rows], table["completion_ids"].to_pylist()[rows])
    ids, attn = micro.input_ids.to(device), micro.attention_mask.to(device)
    mask = micro.completion_mask[:, 1:].to(device)
    with torch.no_grad():
        behavior = model_logprobs(policy, ids, attn)
    adv = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(2)).to(device)

    def micro_step():  # gradients accumulate across calls, as they do across a step's micro-batches
        logp = model_logprobs(policy, ids, attn)
        ppo_loss(logp, behavior, adv, mask, 0.2, behavior - 0.01, 0.01).loss.backward()

    peak = _peak_gib(device, micro_step)
    return _timed({LEARNER_CASE: micro_step}, args.repeats, device)[LEARNER_CASE], peak


def bench_model(key: str, args: argparse.Namespace) -> list[dict]:
    from probes.probe import LinearProbe

    arch, device = MODELS[key], args.device
    path = str(build_model(key, arch, args.dtype, device))
    mid = arch.layers // 2
    probe_stem = Path(tempfile.mkdtemp()) / "probe"
    LinearProbe("probe", mid, torch.randn(arch.hidden, generator=torch.Generator().manual_seed(1)) * 0.05,
                torch.zeros(1)).save(probe_stem)
    table = rollouts(args.seqs, args.tokens, arch.vocab)
    tokens = args.seqs * args.tokens
    seconds, peaks = scorer_cases(path, probe_stem, mid, table, args)
    _free(device)
    seconds[LEARNER_CASE], peaks[LEARNER_CASE] = learner_case(path, table, args)
    _free(device)

    # --- beside the cost model ---------------------------------------------------------------------------------
    util, peak, nan = Utilisation(), args.peak_tflops * 1e12, float("nan")
    full = forward_flops_per_token(arch, args.tokens / 2)
    no_head = forward_flops_per_token(arch, args.tokens / 2, lm_head=False)
    truncated = forward_flops_per_token(arch, args.tokens / 2, layers=mid + 1, lm_head=False)
    dots = 2 * arch.hidden * (1 - max(1, args.tokens // 4) / args.tokens)  # the probe's dot product, completion tokens
    ref_only, fused, cut = SCORER_CASES
    flops = {ref_only: (full, util.score), fused: (full + dots, util.score), cut: (truncated + dots, util.score),
             HOOK_CASES[0]: (full, util.score), HOOK_CASES[1]: (full, util.score), LEARNER_CASE: (3 * full, util.learn)}
    rows = []
    for name, (per_token, u) in flops.items():
        n = args.micro_batch * args.tokens if name == LEARNER_CASE else tokens
        tps = n / seconds[name]
        rows.append({"model": key, "kind": "throughput", "case": name, "tokens": n, "seconds": seconds[name],
                     "tokens_per_s": tps, "peak_gib": peaks[name], "flops_per_token": per_token,
                     "predicted_tokens_per_s": u * peak / per_token, "share_of_peak": tps * per_token / peak,
                     "ratio": nan, "predicted_ratio": nan})
    ratio = {"hooked / unhooked time": (seconds[HOOK_CASES[1]] / seconds[HOOK_CASES[0]], 1.0),
             "fused / reference-only time": (seconds[fused] / seconds[ref_only], (full + dots) / full),
             "truncated / full scorer pass time": (seconds[cut] / seconds[ref_only], (truncated + dots) / full)}
    for name, (measured, predicted) in ratio.items():
        rows.append({"model": key, "kind": "ratio", "case": name, "tokens": tokens, "seconds": nan, "tokens_per_s": nan,
                     "peak_gib": nan, "flops_per_token": nan, "predicted_tokens_per_s": nan, "share_of_peak": nan,
                     "ratio": measured, "predicted_ratio": predicted})
    print(f"  layers used / total by the truncated pass: {mid + 1}/{arch.layers}; the head is "
          f"{1 - no_head / full:.0%} of a full pass's FLOPs at this vocabulary", flush=True)
    return rows


def _max_diff(a, b) -> float:
    import numpy as np

    x = np.concatenate([np.asarray(r, dtype=np.float64) for r in a.to_pylist()])
    y = np.concatenate([np.asarray(r, dtype=np.float64) for r in b.to_pylist()])
    return float(np.abs(x - y).max()) if x.size else 0.0


def print_table(rows: list[dict]) -> None:
    print("\n| model | case | tokens/s | predicted tokens/s | share of peak | peak GiB |\n|---|---|---|---|---|---|")
    for r in (r for r in rows if r["kind"] == "throughput"):
        peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"  # no GPU, no GPU memory
        print(f"| {r['model']} | {r['case']} | {r['tokens_per_s']:,.0f} | {r['predicted_tokens_per_s']:,.0f} | "
              f"{r['share_of_peak']:.1%} | {peak} |")
    print("\n| model | ratio | measured | FLOPs ratio (cost model) |\n|---|---|---|---|")
    for r in (r for r in rows if r["kind"] == "ratio"):
        print(f"| {r['model']} | {r['case']} | {r['ratio']:.3f} | {r['predicted_ratio']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["0.5b", "7b"], choices=sorted(MODELS), help="shapes to run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seqs", type=int, default=16, help="sequences scored per call")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per sequence (a quarter of them prompt)")
    ap.add_argument("--token-budget", type=int, default=65536, help="the scorer's token budget per batch")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences in the learner's micro-batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_FLOPS / 1e12,
                    help="the device's dense peak the predictions use (default: the cost model's)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest difference allowed between the cases")
    ap.add_argument("--out", default=None, help="folder for results.parquet (and nothing else)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a GPU machine, or pass --device cpu (slow beyond --model "
              "tiny)", file=sys.stderr)
        return 2
    if args.micro_batch > args.seqs:
        ap.error("--micro-batch must be at most --seqs")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{where}; {args.dtype}; {args.seqs} x {args.tokens} tokens a scorer call, learner micro-batch "
          f"{args.micro_batch}; {args.repeats} repeats", flush=True)
    rows = []
    for key in args.model:
        print(f"\n{MODELS[key].name}", flush=True)
        rows += bench_model(key, args)
    print_table(rows)
    if args.out:
        import pyarrow as pa
        import pyarrow.parquet as pq

        Path(args.out).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), Path(args.out) / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
