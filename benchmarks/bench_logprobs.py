"""Memory of the sampled-token log-probs at a real vocabulary: full log-softmax against the chunked head.

    .venv/bin/python benchmarks/bench_logprobs.py [--vocab 151936 --hidden 256 --seqs 16 --tokens 256]

Scores one batch with a random Llama whose vocabulary is Qwen-sized, two ways, each in a fresh process:
`full` is what the scorer did before (the model's whole (B, T, V) logits, then a float32 log_softmax of them);
`chunked` is `pipeline.data.logprobs.model_logprobs` (the output head applied a chunk of positions at a time). It
prints the peak resident memory each adds above the loaded model, the time, the largest difference between the
two results, and the estimate of both for `configs/gpu.toml`'s scorer budget at a given hidden size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import random_llama


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _score(model_dir: str, mode: str, seqs: int, tokens: int, out: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pipeline.data.logprobs import model_logprobs

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (seqs, tokens), generator=gen)
    attn = torch.ones_like(ids)
    with torch.no_grad():  # warm up on one short row so allocator and kernels are in place
        model(input_ids=ids[:1, :8], attention_mask=attn[:1, :8])
    base = _peak_mib()
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "full":
            logits = model(input_ids=ids, attention_mask=attn).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        else:
            logp = model_logprobs(model, ids, attn)
    seconds = time.perf_counter() - start
    save_file({"logp": logp.contiguous()}, out)
    print(json.dumps({"mode": mode, "peak_mib": _peak_mib() - base, "seconds": seconds}))


def gpu_estimate(tokens: int, vocab: int, hidden: int, chunk: int) -> dict[str, float]:
    """GB for the log-prob step of one scorer batch of `tokens` tokens with bf16 weights, by construction."""
    gb = 1e9
    full = tokens * vocab * (2 + 4 + 4) / gb  # bf16 logits, their float32 copy, the float32 log_softmax
    chunked = (tokens * hidden * 2 + chunk * vocab * (2 + 4 + 4)) / gb  # hidden states + one chunk's worth
    return {"full_gb": full, "chunked_gb": chunked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gpu-tokens", type=int, default=65536, help="scorer token budget to extrapolate to "
                    "(configs/gpu.toml: 65536)")
    ap.add_argument("--gpu-hidden", type=int, default=3584, help="hidden size to extrapolate to (Qwen2.5-7B: 3584)")
    ap.add_argument("--score", nargs=4, metavar=("MODEL", "MODE", "SEQS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.score:
        model_dir, mode, seqs, out = args.score
        _score(model_dir, mode, int(seqs), args.tokens, out)
        return
    from safetensors.torch import load_file

    from pipeline.data.logprobs import CHUNK_TOKENS

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_llama(Path(tmp) / "model", args.layers, args.hidden, vocab=args.vocab)
        results, outputs = {}, {}
        for mode in ("full", "chunked"):
            out = str(Path(tmp) / f"{mode}.safetensors")
            proc = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--score", str(model_dir),
                                   mode, str(args.seqs), out], capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[mode] = load_file(out)["logp"]
    diff = float((outputs["full"] - outputs["chunked"]).abs().max())
    n = args.seqs * args.tokens
    print(f"batch {args.seqs} x {args.tokens} tokens, vocabulary {args.vocab}, hidden {args.hidden}; "
          f"float32 logits alone would be {n * args.vocab * 4 / 2**20:.0f} MiB")
    for mode, r in results.items():
        print(f"{mode:>8}: peak +{r['peak_mib']:8.0f} MiB above the loaded model   {r['seconds']:.2f} s")
    print(f"memory full/chunked: {results['full']['peak_mib'] / max(results['chunked']['peak_mib'], 1):.1f}x;  "
          f"max |difference| {diff:.2e}")
    est = gpu_estimate(args.gpu_tokens, args.vocab, args.gpu_hidden, CHUNK_TOKENS)
    print(f"estimate for a {args.gpu_tokens}-token scorer batch (bf16 model, hidden {args.gpu_hidden}): "
          f"log-prob step {est['full_gb']:.0f} GB full, {est['chunked_gb']:.1f} GB chunked")


if __name__ == "__main__":
    main()
