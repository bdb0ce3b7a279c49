"""A learner checkpoint written and restored, timed, and checked to resume exactly.

    python benchmarks/bench_checkpoint.py                                     # 0.5b, bf16, ZeRO-0, on one GPU
    python benchmarks/bench_checkpoint.py --model tiny --device cpu --dtype bfloat16 --steps 2   # a CPU check

One learner rank (`learner.learner.Learner`, the code the learner actor runs: DeepSpeed, the run's dtype) takes
`--steps` optimizer steps on random tokens, writes a checkpoint (`save_checkpoint`: weights in the model's
dtype, fp32 master weights and Adam moments, RNG, step) and takes one more step. A second learner, freshly set
up, restores the checkpoint (`load_checkpoint`) and takes the same step. Its weights must then equal the first
learner's bit for bit: that is what exact recovery means, and the script fails when they differ. Prints the
seconds to write and to restore, the checkpoint's size on disk, and the write speed; `--out` writes
checkpoint.parquet. Needs torch, transformers and DeepSpeed (no Ray or vLLM).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import random_llama_of

from pipeline.analysis.cost import PRESETS, Arch

TINY = Arch("tiny (a CPU check of this script)", 4, 128, 384, 1024, 2, 2, 64)
MODELS = {"tiny": TINY, **{k: PRESETS[k] for k in ("0.5b", "7b")}}


def train_table(rows: int, tokens: int, vocab: int, seed: int):
    """`rows` rows of random prompt and completion ids with behaviour log-probs near a random policy's."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.schema import NONFINITE, REF_LOGPROBS, REWARD_FIELDS, rollout_table

    rng = np.random.default_rng(seed)
    prompt_len = max(1, tokens // 4)
    prompts = rng.integers(4, vocab, (rows, prompt_len)).tolist()
    comps = rng.integers(4, vocab, (rows, tokens - prompt_len)).tolist()
    behavior = [[-float(np.log(vocab))] * len(c) for c in comps]
    table = rollout_table(prompts, comps, behavior, groups=[i // 4 for i in range(rows)])
    table = table.append_column(REF_LOGPROBS, pa.array(behavior, REF_LOGPROBS.type))
    table = table.append_column(NONFINITE, pa.array([False] * rows))
    reward = rng.random(rows).astype(np.float32)
    adv = rng.standard_normal(rows).astype(np.float32)
    for f, v in zip(REWARD_FIELDS, (reward, reward, np.ones(rows, bool), adv), strict=True):
        table = table.append_column(f, pa.array(v, f.type))
    return table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_learner(path: Path, args: argparse.Namespace, port: int):
    from learner.learner import Learner
    from pipeline.config import LearnerConfig

    cfg = LearnerConfig(num_cpus=args.threads, num_gpus=1 if args.device == "cuda" else 0, zero_stage=args.zero_stage,
                        micro_batch_size=args.rows, lr=1e-4, warmup_steps=2, gradient_checkpointing=True)
    learner = Learner(model_path=str(path), cfg=cfg, rows_per_step=args.rows, dtype=args.dtype)
    learner.setup("127.0.0.1", port)
    return learner


def state_of(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in learner.engine.module.named_parameters()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps before the checkpoint")
    ap.add_argument("--rows", type=int, default=8, help="sequences a step")
    ap.add_argument("--tokens", type=int, default=512, help="tokens a sequence")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: the temp folder)")
    ap.add_argument("--out", default=None, help="folder for checkpoint.parquet")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_checkpoint: no CUDA device here; run it on a GPU machine, or pass --device cpu", file=sys.stderr)
        return 2
    arch = MODELS[args.model]
    from pipeline.worlds.toy import build_tokenizer

    model_path = Path(tempfile.gettempdir()) / f"probe-rl-ckpt-{args.model}-{args.dtype}"
    random_llama_of(arch, model_path, args.dtype, args.device, tokenizer=build_tokenizer())
    port = _free_port()
    first = new_learner(model_path, args, port)
    tables = [train_table(args.rows, args.tokens, arch.vocab, s) for s in range(args.steps + 1)]
    for t in tables[:-1]:
        first.train_step(t)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="probe-rl-ckpt-"))
    start = time.perf_counter()
    ckpt = first.save_checkpoint(str(folder))
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
    first.train_step(tables[-1])
    want = state_of(first)
    del first
    second = new_learner(model_path, args, port)
    start = time.perf_counter()
    second.load_checkpoint(ckpt)
    load_s = time.perf_counter() - start
    second.train_step(tables[-1])
    got = state_of(second)
    differ = [n for n in want if not torch.equal(want[n], got[n])]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{where}; {arch.name}, {args.dtype}, ZeRO-{args.zero_stage}: checkpoint of version {args.steps} "
          f"({size / 2**30:.2f} GiB on disk) written in {save_s:.2f} s ({size / save_s / 2**30:.2f} GiB/s), "
          f"restored in {load_s:.2f} s", flush=True)
    print(f"one more step after the restore: {len(want) - len(differ)} of {len(want)} tensors equal the "
          "uninterrupted learner's bit for bit", flush=True)
    if args.out:
        import pyarrow as pa
        import pyarrow.parquet as pq

        Path(args.out).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{
            "model": args.model, "dtype": args.dtype, "zero_stage": args.zero_stage, "device": where,
            "bytes": size, "save_s": save_s, "load_s": load_s, "tensors": len(want), "tensors_equal": len(want) - len(differ),
        }]), Path(args.out) / f"checkpoint-{args.model}.parquet")
    if differ:
        print(f"bench_checkpoint: the restored learner's step differs from the uninterrupted one in {len(differ)} "
              f"tensors (first {differ[0]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
