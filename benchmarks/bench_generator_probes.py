"""What reading probes inside vLLM's sampling pass costs the generator (pipeline/transport/vllm_probes.py).

    .venv/bin/python benchmarks/bench_generator_probes.py [--layers 8 --hidden 512 --prompts 32 --n 4 --tokens 160]

Two generators on the same random Llama (default: the mid world's shape, 8 x 512, head_dim 64), each with vLLM's
engine in its own process: one plain, one reading probes at the middle layer. They sample the same seeded
prompts (so the same tokens: a probe read changes no logit), alternating A B A B; every figure is a ratio
measured in this one run. Target: the probe-reading generator within 2% of the plain one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--tokens", type=int, default=160, help="completion tokens (the random model rarely stops)")
    ap.add_argument("--probes", type=int, default=1, help="probes read (on two layers when more than one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import pyarrow as pa
    import torch
    from _common import random_llama

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig
    from pipeline.data.schema import PROMPT_SCHEMA
    from probes.probe import LinearProbe

    root = Path(tempfile.mkdtemp(prefix="bench_gen_probes_"))
    model = random_llama(root / "model", args.layers, args.hidden)
    g = torch.Generator().manual_seed(0)
    probes = []
    for k in range(args.probes):
        layer = args.layers // 2 - (k % 2)
        stem = LinearProbe(f"p{k}", layer, torch.randn(args.hidden, generator=g) / args.hidden ** 0.5,
                           torch.zeros(1)).save(root / f"p{k}")
        probes.append((f"p{k}", str(stem), None))
    cfg = GeneratorConfig(num_cpus=args.threads, max_new_tokens=args.tokens, max_model_len=args.tokens + 64,
                          engine_process="separate", enforce_eager=True, kv_cache_gib=2)
    plain = Generator(model_path=str(model), cfg=cfg, weight_backend="probe_rl_inline")
    reads = Generator(model_path=str(model), cfg=cfg, weight_backend="probe_rl_inline", probes=probes)
    rng = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(4, 1024, (int(torch.randint(8, 32, (1,), generator=rng)),), generator=rng).tolist()
               for _ in range(args.prompts)]
    table = pa.Table.from_pydict({"prompt_id": list(range(args.prompts)), "group_id": list(range(args.prompts)),
                                  "prompt_ids": prompts, "answer": [""] * args.prompts}, schema=PROMPT_SCHEMA)
    a, _ = plain.generate(table, args.n, 0)  # warm-up, and the same tokens from both
    b, _ = reads.generate(table, args.n, 0)
    assert a.column("completion_ids").equals(b.column("completion_ids")), "a probe read changed the sampled tokens"
    tokens = sum(len(c) for c in a.column("completion_ids").to_pylist())
    times: dict[str, list[float]] = {"plain": [], "reads": []}
    for _ in range(args.repeats):
        for name, gen in (("plain", plain), ("reads", reads)):
            start = time.perf_counter()
            gen.generate(table, args.n, 0)
            times[name].append(time.perf_counter() - start)
    ratios = sorted(r / p for r, p in zip(times["reads"], times["plain"], strict=True))
    print(f"model {args.layers} x {args.hidden}; {args.prompts} prompts x {args.n} completions, {tokens} completion "
          f"tokens a call; {args.probes} probe(s) read; {args.repeats} alternating rounds")
    for name in times:
        med = statistics.median(times[name])
        print(f"  {name:6s} median {med:.3f} s a call ({tokens / med:.0f} tokens/s), min {min(times[name]):.3f} s")
    print(f"  reads / plain, per round: median {statistics.median(ratios):.4f} (min {ratios[0]:.4f}, max "
          f"{ratios[-1]:.4f}); fastest call / fastest call: {min(times['reads']) / min(times['plain']):.4f}")


if __name__ == "__main__":
    main()
