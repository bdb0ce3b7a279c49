"""What vLLM's CPU linear layers cost on two kernels: its oneDNN matmul handler (what vLLM picks on CPUs) and
`torch.nn.functional.linear` (what probe-rl's engines use: pipeline/transport/vllm_weights.py,
`linear_without_onednn`), at SmolLM2-135M's projection shapes, one thread, decode- and prefill-sized batches.
Prints ms per call and the ratio, measured in one run.

    python benchmarks/bench_cpu_linear.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

SHAPES = {"q/k/v/o (576 x 576)": (576, 576), "gate/up (1536 x 576)": (1536, 576), "down (576 x 1536)": (576, 1536),
          "output head (49152 x 576)": (49152, 576)}


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import torch
    import vllm._custom_ops as ops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| shape | rows | oneDNN ms | F.linear ms | F.linear / oneDNN |\n|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        handler = ops.create_onednn_mm(w.t(), 32)
        repeats = max(2, args.repeats // (10 if n > 10000 else 1))
        for m in (32, 256):
            x = torch.randn(m, k)
            a = _ms(lambda: ops.onednn_mm(handler, x, None), repeats)  # noqa: B023 - timed at once
            b = _ms(lambda: torch.nn.functional.linear(x, w), repeats)  # noqa: B023
            print(f"| {name} | {m} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
