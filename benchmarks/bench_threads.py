"""A learner's pass (forward, log-softmax, backward) on a model at 1, 2, ... CPU threads: seconds (median of
--repeats), the speed-up over one thread, and whether logits and gradients are bit-equal across thread counts (what
lets pipeline.cores = "phase" change a role's threads between calls without changing a run). Run it on an idle
machine: another process on the cores slows the multi-thread passes most.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_threads.py --model smollm2 --rows 16 --tokens 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help='a model folder, a hub id, or "smollm2" (the packaged model)')
    ap.add_argument("--rows", type=int, default=16, help="sequences per pass (a learner micro-batch)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per sequence")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 to the cores)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.cores import node_cores, set_threads
    from pipeline.worlds.pretrained import ensure_packaged_model, is_packaged

    path = str(ensure_packaged_model(args.model, "~/.cache/probe-rl")) if is_packaged(args.model) else args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    counts = args.threads or list(range(1, node_cores() + 1))
    print(f"{os.path.basename(path.rstrip('/'))}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.rows} x {args.tokens} tokens, {node_cores()} cores", flush=True)
    first, base = None, None
    for n in counts:
        set_threads(n)
        times = []
        for _ in range(args.repeats):
            model.zero_grad()
            start = time.perf_counter()
            logits = model(ids).logits
            torch.log_softmax(logits, -1).mean().backward()
            times.append(time.perf_counter() - start)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        same = "" if first is None else (
            f", logits and gradients bit-equal to 1 thread's: {torch.equal(first[0], logits) and torch.equal(first[1], grads)}")
        if first is None:
            first = (logits.detach().clone(), grads.clone())
        med = statistics.median(times)
        base = base or med
        print(f"{n} thread(s): {med:.2f} s ({min(times):.2f}-{max(times):.2f}), {base / med:.2f}x one thread{same}",
              flush=True)


if __name__ == "__main__":
    main()
