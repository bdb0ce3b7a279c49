"""Generator: a vLLM engine that turns prompt tables into rollout tables, and loads new weights.

A plain class; `pipeline/remote.py` makes it a Ray actor. On CPU the engine runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the multiprocess engine is ~80x slower for small batches
there. Weights are loaded through vLLM's layerwise reload, the same path its own weight-transfer
engines use, so a transformers-format state dict lands correctly in fused vLLM layers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import GeneratorConfig
from pipeline.faults import maybe_die
from pipeline.schema import ROLLOUT_SCHEMA

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.int64()),  # (P,) index into the task dataset
        pa.field("group_id", pa.int64()),  # (P,) unique per prompt per step; all its completions share it
        pa.field("prompt_ids", pa.list_(pa.int32())),  # (P, T_p) prompt token ids
        pa.field("answer", pa.string()),  # (P,) reference answer for the reward function
    ]
)


@dataclass(frozen=True)
class GenerateStats:
    seconds: float
    num_tokens: int  # completion tokens generated
    policy_version: int


def configure_cpu_env(kv_cache_gib: int, num_threads: int) -> None:
    """Environment vLLM's CPU backend needs; must run before vllm is imported in this process."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # actors share cores; let the OS place threads
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))


class Generator:
    def __init__(self, model_path: str, cfg: GeneratorConfig, dtype: str = "float32", seed: int = 0) -> None:
        import torch

        self.cfg = cfg
        on_gpu = cfg.num_gpus > 0 and torch.cuda.is_available()
        if not on_gpu:
            configure_cpu_env(cfg.kv_cache_gib, max(1, int(cfg.num_cpus)))
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=False,
        )
        self.version = 0
        # The first sampling call with log-probs pays a one-off warm-up (~20 s on CPU); pay it at start-up.
        self.greedy([[0]], 2)
        self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(n=2, max_tokens=2, logprobs=0,
                          detokenize=False), use_tqdm=False)

    def generate(self, prompts: pa.Table, n: int, seed: int) -> tuple[pa.Table, GenerateStats]:
        """`n` sampled completions per prompt row; rows come out grouped by prompt, in prompt order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        assert prompts.schema.equals(PROMPT_SCHEMA), prompts.schema
        maybe_die("generator")
        start = time.perf_counter()
        params = SamplingParams(
            n=n, temperature=self.cfg.temperature, max_tokens=self.cfg.max_new_tokens, logprobs=0,
            seed=seed, detokenize=False,
        )
        rows = prompts.to_pydict()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in rows["prompt_ids"]], params, use_tqdm=False
        )
        cols: dict[str, list] = {f.name: [] for f in ROLLOUT_SCHEMA}
        num_tokens = 0
        for i, out in enumerate(outputs):
            for comp in out.outputs:
                token_ids = list(comp.token_ids)
                # logprobs=0 returns exactly the sampled token's log-prob at each step
                logprobs = [step[tok].logprob for step, tok in zip(comp.logprobs, token_ids, strict=True)]
                cols["prompt_id"].append(rows["prompt_id"][i])
                cols["group_id"].append(rows["group_id"][i])
                cols["prompt_ids"].append(rows["prompt_ids"][i])
                cols["completion_ids"].append(token_ids)
                cols["behavior_logprobs"].append(logprobs)
                cols["policy_version"].append(self.version)
                cols["answer"].append(rows["answer"][i])
                num_tokens += len(token_ids)
        table = pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)
        return table, GenerateStats(time.perf_counter() - start, num_tokens, self.version)

    def update_weights(self, weights, version: int) -> int:
        """Load transformers-named weights (`WireWeights` or a state dict) as weight version `version`."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        from pipeline.weights import from_wire

        if version < self.version:
            raise ValueError(f"generator holds weight version {self.version}; refusing older version {version}")
        model_config = self.llm.llm_engine.model_config
        named_tensors = from_wire(weights)

        def load(model):
            initialize_layerwise_reload(model)
            model.load_weights(iter(named_tensors.items()))
            finalize_layerwise_reload(model, model_config)

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (token ids), for evaluation and the weight-sync check."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def ready(self) -> int:
        return self.version
