"""Weight sync, learner to generator, end to end: seconds per version and bytes/s of each transport.

    .venv/bin/python benchmarks/bench_weight_sync.py                       # ~30M and ~300M random Llamas
    .venv/bin/python benchmarks/bench_weight_sync.py --sizes 8x512 --repeats 3

For each model size it starts a real learner rank (DeepSpeed, ZeRO stage `--zero-stage`) and a real vLLM
generator (CPU, engine in the actor's process) as Ray actors, and times, interleaved so machine noise hits
all alike:

- copy: an in-memory copy of the same state dict into preallocated tensors (the floor);
- object_store: learner `get_weights` (rank 0 copies the model to host memory), `ray.put` in the driver,
  generator `load_weights` through vLLM's weight-transfer protocol (probe-rl's inline backend);
- collective: learner `send_weights`, a bucketed gloo broadcast straight into the generator's vLLM worker
  through the same protocol (the transfer group is built once, outside the timing, as in a run).

Both transports end with the generator serving the new version, so the figures are whole syncs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from _common import interleaved, random_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["8x512", "24x1024"],
                    help="LAYERSxHIDDEN of each random Llama (default: about 30M and 300M parameters)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--zero-stage", type=int, default=0, choices=[0, 2, 3])
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for size in args.sizes:
            layers, hidden = (int(x) for x in size.split("x"))
            path = random_llama(Path(tempfile.gettempdir()) / f"probe-rl-bench-llama-{layers}x{hidden}-v{args.vocab}",
                                layers, hidden, vocab=args.vocab)
            bench_size(path, args)
    finally:
        ray.shutdown()


def bench_size(path: Path, args) -> None:
    import ray
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from learner.learner import Learner
    from pipeline.config import GeneratorConfig, LearnerConfig
    from pipeline.loop.fleet import setup_learners
    from pipeline.loop.remote import Receiver, ReceiverClient, make_actor, wait
    from pipeline.transport.weights import BACKEND_GLOO, BACKEND_INLINE

    state = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).named_parameters()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    params = sum(v.numel() for v in state.values())
    print(f"\nrandom Llama {path.name}: {params / 1e6:.0f}M parameters, {nbytes / 2**20:.0f} MiB of float32 weights")

    learner = make_actor(Learner, "learner", 1, model_path=str(path), rows_per_step=8,
                         cfg=LearnerConfig(zero_stage=args.zero_stage, micro_batch_size=8))
    setup_learners([learner], 600)
    gcfg = GeneratorConfig(max_model_len=128, kv_cache_gib=1, num_cpus=1)
    gens = {backend: make_actor(Generator, "generator", 1, model_path=str(path), cfg=gcfg, weight_backend=backend)
            for backend in (BACKEND_INLINE, BACKEND_GLOO)}
    wait([g.ready.remote() for g in gens.values()], "generator", 600)
    client = ReceiverClient([Receiver("generator", gens[BACKEND_GLOO])], 600)
    wait(learner.init_weight_transfer.remote(client, BACKEND_GLOO, int(args.bucket_mb * 2**20), 120.0, "bench"),
         "learner", 600)

    dst = {k: torch.empty_like(v) for k, v in state.items()}
    version = iter(range(1, 10**6))

    def copy():
        for k, v in state.items():
            dst[k].copy_(v)

    def object_store():
        wire = wait(learner.get_weights.remote(), "learner", 600)
        wait(gens[BACKEND_INLINE].load_weights.remote(ray.put(wire), next(version)), "generator", 600)

    def collective():
        wait(learner.send_weights.remote(), "learner", 600)

    t = interleaved({"copy": copy, "object_store": object_store, "collective": collective}, args.repeats)
    floor = statistics.median(t["copy"])
    for name, label in (("copy", "in-memory copy (floor)"), ("object_store", "object store, end to end"),
                        ("collective", "collective (gloo), end to end")):
        med = statistics.median(t[name])
        print(f"  {label:<32} {med:8.3f} s/version (min {min(t[name]):.3f}, n={len(t[name])})   "
              f"{nbytes / med / 2**30:6.2f} GiB/s   x{med / floor:5.1f} the copy")
    ratio = statistics.median(o / c for o, c in zip(t["object_store"], t["collective"], strict=True))
    print(f"  object store / collective, paired by round: {ratio:.2f}")
    for a in (learner, *gens.values()):
        ray.kill(a)


if __name__ == "__main__":
    main()
