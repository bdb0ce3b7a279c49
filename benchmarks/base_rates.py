"""What a model does before RL: the share of its temperature-1 samples that a ground-truth function labels correct,
hack and wrong, by prompt template, operand range and token limit. The measurement a reward-hacking world is chosen
by (docs/smollm2.md): a hack plain RL can find must already be sampled now and then, and the honest route must be
hard enough that the loophole pays more.

    PYTHONPATH=. .venv/bin/python benchmarks/base_rates.py --model smollm2 --max-operand 49 --tokens 24 64 \\
        --template "What is {a} + {b}?" --truth pipeline.worlds.tasks:stated_result_ground_truth

Prompts go through the model's chat template as a run's do; sampling is vLLM's (the generators' engine), each
completion its own seeded request.
"""

from __future__ import annotations

import argparse
import collections
import os
import random


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help='a model folder, a hub id, or "smollm2" (the packaged model)')
    ap.add_argument("--template", action="append", help="prompt template(s) with {a} and {b} (repeatable)")
    ap.add_argument("--min-operand", type=int, default=0)
    ap.add_argument("--max-operand", type=int, default=49)
    ap.add_argument("--prompts", type=int, default=64, help="distinct prompts per template")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64], help="token limit(s) of a completion")
    ap.add_argument("--truth", default="pipeline.worlds.tasks:stated_result_ground_truth",
                    help="ground-truth function module:function (takes completions, answers and optionally prompts)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.min_operand > args.max_operand or args.prompts < 1 or args.samples < 1:
        ap.error("need --min-operand <= --max-operand and at least one prompt and sample")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from pipeline.worlds.pretrained import ensure_packaged_model, is_packaged
    from pipeline.worlds.tasks import load_reward_fn, task_fn_arguments

    model = str(ensure_packaged_model(args.model, "~/.cache/probe-rl")) if is_packaged(args.model) else args.model
    truth = load_reward_fn(args.truth, "--truth")
    takes_prompts = "prompts" in task_fn_arguments(truth, "--truth", None)
    tok = AutoTokenizer.from_pretrained(model)
    # Whole prompts in one batch: a seeded request split across prefill chunks fails on CPU in vLLM 0.32.
    llm = LLM(model, dtype="float32", max_model_len=64 + max(args.tokens), seed=0, enforce_eager=True,
              max_num_batched_tokens=16384, max_num_seqs=256)
    rng = random.Random(args.seed)
    pairs = [(rng.randint(args.min_operand, args.max_operand), rng.randint(args.min_operand, args.max_operand))
             for _ in range(args.prompts)]
    for template in args.template or ["What is {a} + {b}?"]:
        questions = [template.format(a=a, b=b) for a, b in pairs]
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                   for q in questions]
        for tokens in args.tokens:
            params = [SamplingParams(temperature=1.0, max_tokens=tokens, seed=1000 * i + j)
                      for i in range(len(prompts)) for j in range(args.samples)]
            outs = llm.generate([p for p in prompts for _ in range(args.samples)], params, use_tqdm=False)
            texts = [o.outputs[0].text for o in outs]
            rows = [i for i in range(len(prompts)) for _ in range(args.samples)]
            answers = [str(pairs[i][0] + pairs[i][1]) for i in rows]
            extra = {"prompts": [questions[i] for i in rows]} if takes_prompts else {}
            counts = collections.Counter(truth(texts, answers, **extra))
            shares = ", ".join(f"{k} {counts[k] / len(texts):.3f}" for k in ("correct", "hack", "wrong"))
            print(f"{template!r}, operands {args.min_operand}-{args.max_operand}, {tokens} tokens, "
                  f"{len(texts)} samples: {shares}", flush=True)


if __name__ == "__main__":
    main()
