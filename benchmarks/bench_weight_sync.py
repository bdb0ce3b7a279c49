"""Weight sync: bytes per second of each leg of the CPU weight path against a plain in-memory copy.

    .venv/bin/python benchmarks/bench_weight_sync.py [--layers 8 --hidden 512 --repeats 5]

Legs: (1) a plain in-memory copy of the state dict into preallocated tensors (the floor); (2) Ray's
object store: ray.put + fetch in another process, as the driver publishes weights, both as numpy
arrays (what probe-rl sends: zero-copy) and as pickled torch tensors;
(3) loading into a vLLM engine through the layerwise reload (`Generator.update_weights`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from _common import interleaved, random_llama, summary


def _fetch(wire):  # runs in a Ray worker: receives the weights through the object store
    from pipeline.weights import from_wire

    return sum(v.numel() for v in from_wire(wire).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    import ray
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    path = random_llama(Path(tempfile.gettempdir()) / f"probe-rl-bench-llama-{args.layers}x{args.hidden}",
                        args.layers, args.hidden)
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    print(f"model: random Llama {args.layers}x{args.hidden}, {nbytes / 2**20:.1f} MiB of weights")

    dst = {k: torch.empty_like(v) for k, v in state.items()}

    def copy():
        for k, v in state.items():
            dst[k].copy_(v)

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    fetch = ray.remote(_fetch)

    from pipeline.weights import to_wire

    def object_store():
        ray.get(fetch.remote(ray.put(to_wire(state, 0))))

    def object_store_torch():  # the same through pickled torch tensors, for comparison
        ray.get(fetch.remote(ray.put(state)))

    gen = Generator(str(path), GeneratorConfig(max_model_len=128))
    version = iter(range(1, 10**6))

    def vllm_load():
        gen.update_weights(state, next(version))

    t = interleaved({"copy": copy, "object_store": object_store, "object_store_torch": object_store_torch,
                     "vllm_load": vllm_load}, args.repeats)
    ray.shutdown()
    floor = min(t["copy"])
    for name, label in (("copy", "in-memory copy"), ("object_store", "object store, numpy (used)"),
                        ("object_store_torch", "object store, torch pickled"),
                        ("vllm_load", "vLLM layerwise reload")):
        best = min(t[name])
        print(f"  {label:<28} {summary(t[name])}   {nbytes / best / 2**30:6.2f} GiB/s   "
              f"x{best / floor:.1f} the copy")
    total = min(t["object_store"]) + min(t["vllm_load"])
    print(f"  publish + load, end to end: {nbytes / total / 2**30:.2f} GiB/s, x{total / floor:.1f} a plain copy")


if __name__ == "__main__":
    main()
