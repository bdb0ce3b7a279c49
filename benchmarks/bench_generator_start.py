"""How long a CPU generator takes to start, with vLLM's sampler ops traced by TorchDynamo (what vLLM does even
with enforce_eager) and run eagerly (what probe-rl's eager CPU generators do, `actors/generator.py:
_sampler_ops_eager`). Each start runs in a fresh process (TorchDynamo's switch is per process), on a tiny random
Llama with the toy tokenizer, after vLLM is imported; the cases alternate, and their greedy completions are
compared.

    PYTHONPATH=. python benchmarks/bench_generator_start.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASE = """
import json, sys, time
import vllm  # imported before the clock starts: the same in both cases
import actors.generator as g
from pipeline.config import GeneratorConfig
if sys.argv[2] == "traced":
    eager = g._sampler_ops_eager
    g._sampler_ops_eager = lambda _: eager(False)  # TorchDynamo left on, as vLLM has it
start = time.perf_counter()
gen = g.Generator(model_path=sys.argv[1], cfg=GeneratorConfig(max_new_tokens=8), weight_backend="probe_rl_inline")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "greedy": gen.greedy([[1, 5, 6, 7], [1, 9, 10]], 8)}))
"""


def tiny_model(path: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.worlds.toy import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="starts per case (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model")
        results: dict[str, list[dict]] = {"traced": [], "eager": []}
        for r in range(args.repeats):
            for case in ("traced", "eager"):
                out = subprocess.run([sys.executable, "-c", CASE, model, case], capture_output=True, text=True,
                                     check=False)
                if out.returncode != 0:
                    sys.exit(f"the {case} start failed:\n{out.stderr[-3000:]}")
                results[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"repeat {r}: {case:6s} start {results[case][-1]['seconds']:.2f} s", flush=True)
    traced = statistics.median(x["seconds"] for x in results["traced"])
    eager = statistics.median(x["seconds"] for x in results["eager"])
    same = all(x["greedy"] == results["traced"][0]["greedy"] for x in results["traced"] + results["eager"])
    print(f"median start: traced {traced:.2f} s, eager {eager:.2f} s, eager / traced {eager / traced:.3f}; "
          f"greedy completions {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
