"""Weights handed from one process to another on the same machine: through CUDA IPC, and through a host copy.

    python benchmarks/bench_handoff.py                       # 0.5b, bf16, on one GPU
    python benchmarks/bench_handoff.py --model tiny --device cpu --dtype float32 --repeats 2   # the host path on a CPU

What a colocated or same-node deployment would use instead of a broadcast: the learner's process (the sender)
holds a state dict of a random Llama of a `pipeline.analysis.cost` preset's shape, built on the device; a second process
(the receiver, a generator or a scorer) holds a model-sized set of buffers of its own and must end with the
sender's values in them. Two ways, timed from the sender's first call to the receiver's last device sync:

- **CUDA IPC** (`--device cuda` only): the sender puts its tensors on a `torch.multiprocessing` queue, which sends
  an IPC handle per storage (what vLLM's `ipc` weight-transfer engine sends); the receiver opens them and copies
  device to device into its own buffers. The first hand-off opens every handle ("cold"); later ones find them
  in torch's cache of opened storages, as repeated syncs of a learner whose parameters stay in place do
  ("warm").
- **Host copy**: the sender copies every tensor into one shared-memory host buffer (page-locked with
  `cudaHostRegister` where CUDA is there), the receiver copies from it to its device.

After each hand-off the receiver checks its buffers against the sender's (a sum of every element in float64,
per tensor) and the run stops if any differs. Prints the median seconds of each way over `--repeats` rounds
(interleaved), GB/s of weights moved, and the host / IPC ratio; `--out` writes results.parquet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline.analysis.cost import PRESETS, Arch

TINY = Arch("tiny (a CPU check of this script)", 4, 128, 384, 1024, 2, 2, 64)
MODELS = {"tiny": TINY, **{k: PRESETS[k] for k in ("0.5b", "7b")}}


def state_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Llama of `arch`'s shape (untied head), as transformers names them."""
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    shapes = {"model.embed_tokens.weight": (arch.vocab, h)}
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (arch.ffn, h), p + "mlp.up_proj.weight": (arch.ffn, h),
                   p + "mlp.down_proj.weight": (h, arch.ffn), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (arch.vocab, h)}


def checksums(tensors: dict[str, torch.Tensor]) -> list[float]:
    return [float(t.double().sum()) for t in tensors.values()]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _pin(t: torch.Tensor) -> bool:
    """Page-lock a shared host buffer in this process (so copies to and from the GPU run at full speed)."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    return int(getattr(err, "value", err)) == 0


def receiver(shapes: dict, dtype: str, device: str, host: torch.Tensor, inbox, outbox) -> None:
    """The second process: its own device buffers; takes hand-offs until told to stop."""
    dt = getattr(torch, dtype)
    own = {n: torch.empty(s, dtype=dt, device=device) for n, s in shapes.items()}
    pinned = _pin(host) if device == "cuda" else False
    outbox.put(("ready", pinned))
    while True:
        msg = inbox.get()
        if msg[0] == "stop":
            return
        if msg[0] == "ipc":
            for name, src in msg[1].items():  # tensors rebuilt from IPC handles: device memory of the sender
                own[name].copy_(src, non_blocking=True)
        else:  # "host": one flat shared buffer, tensors back to back
            offset = 0
            for t in own.values():
                t.copy_(host[offset:offset + t.numel()].view(t.shape), non_blocking=True)
                offset += t.numel()
        _sync(device)
        outbox.put(("done", time.perf_counter()))
        if msg[-1]:  # check this one against the sender's sums
            outbox.put(("sums", checksums(own)))
        del msg


def run(args: argparse.Namespace) -> list[dict]:
    arch, device, dt = MODELS[args.model], args.device, getattr(torch, args.dtype)
    shapes = state_shapes(arch)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {n: torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dt) for n, s in shapes.items()}
    numel = sum(t.numel() for t in weights.values())
    nbytes = numel * weights["lm_head.weight"].element_size()
    host = torch.empty(numel, dtype=dt).share_memory_()
    pinned = _pin(host) if device == "cuda" else False
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=receiver, args=(shapes, args.dtype, device, host, inbox, outbox), daemon=True)
    proc.start()
    _, receiver_pinned = outbox.get(timeout=600)
    expected = checksums(weights)
    print(f"{arch.name}: {numel / 1e6:,.1f}M parameters, {nbytes / 2**30:.2f} GiB in {args.dtype} on {device}; host "
          f"buffer page-locked: sender {pinned}, receiver {receiver_pinned}", flush=True)

    def handoff(kind: str, check: bool) -> float:
        start = time.perf_counter()
        if kind == "host":
            offset = 0
            for t in weights.values():
                host[offset:offset + t.numel()].view(t.shape).copy_(t, non_blocking=True)
                offset += t.numel()
            _sync(device)
            inbox.put(("host", check))
        else:
            inbox.put(("ipc", weights, check))
        tag, end = outbox.get(timeout=600)
        assert tag == "done", tag
        if check:
            tag, sums = outbox.get(timeout=600)
            if sums != expected:
                bad = [n for n, a, b in zip(weights, sums, expected, strict=True) if a != b]
                raise SystemExit(f"bench_handoff: the receiver's weights differ from the sender's after the {kind} "
                                 f"hand-off ({len(bad)} tensors, first {bad[0]})")
        return end - start

    kinds = ["ipc", "host"] if device == "cuda" else ["host"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cold = {k: handoff(k, check=True) for k in kinds}  # every way checked once, the first IPC opens the handles
    for _ in range(args.repeats):
        for k in kinds:
            times[k].append(handoff(k, check=False))
    for k in kinds:  # and checked again after the timed rounds
        handoff(k, check=True)
    inbox.put(("stop",))
    proc.join(timeout=60)
    rows = []
    label = {"ipc": "CUDA IPC (warm handles)", "host": "host copy (shared memory)"}
    for k in kinds:
        med = statistics.median(times[k])
        rows.append({"model": args.model, "case": label[k], "bytes": nbytes, "seconds": med,
                     "first_seconds": cold[k], "gb_per_s": nbytes / med / 1e9, "pinned": bool(pinned and receiver_pinned),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    print("\n| model | hand-off | median s | GB/s | first hand-off s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['case']} | {r['seconds']:.4f} | {r['gb_per_s']:.1f} | {r['first_seconds']:.4f} |")
    if device == "cuda":
        print(f"\nhost copy / CUDA IPC: {statistics.median(times['host']) / statistics.median(times['ipc']):.1f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", choices=sorted(MODELS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for results.parquet")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_handoff: no CUDA device here; run it on a GPU machine, or pass --device cpu (host path only)",
              file=sys.stderr)
        return 2
    rows = run(args)
    if args.out:
        import pyarrow as pa
        import pyarrow.parquet as pq

        Path(args.out).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), Path(args.out) / "handoff.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
