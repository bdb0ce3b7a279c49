"""Everything a run needs before any actor starts: model path, tokenizer, prompts, reward, probes.

`build_world` resolves the model (building the toy world if asked), tokenizes the prompt set and
checks every probe against the model's shape, so bad input fails here, early, with a message that
says what to change, before Ray, vLLM or DeepSpeed start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.tasks import GroundTruthFn, PromptSet, RewardFn, arithmetic_prompts, load_prompt_file, load_reward_fn


@dataclass
class World:
    model_path: str
    probe_paths: list[tuple[str, str | None]]  # (probe stem, aggregation override)
    probe_names: list[str]
    tokenizer: object
    pad_id: int
    prompts: PromptSet
    prompt_ids: list[list[int]]
    eval_prompts: PromptSet | None
    eval_prompt_ids: list[list[int]]
    reward_fn: RewardFn
    ground_truth_fn: GroundTruthFn | None = None
    eval_labelled: object = None  # probes.toolkit.Labelled: the fixed set of evaluation checkpoints

    def prompts_for_step(self, step: int, num: int, seed: int) -> pa.Table:
        """The step's prompts: a seeded draw without replacement, the same on every run with this seed."""
        from pipeline.schema import PROMPT_SCHEMA

        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(self.prompts), size=min(num, len(self.prompts)), replace=False)
        return pa.Table.from_pydict(
            {
                "prompt_id": idx.tolist(),
                "group_id": [step * num + i for i in range(len(idx))],
                "prompt_ids": [self.prompt_ids[i] for i in idx],
                "answer": [self.prompts.answers[i] for i in idx],
            },
            schema=PROMPT_SCHEMA,
        )

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(completions, skip_special_tokens=True)


def resolve_model_path(path: str) -> str:
    """A local model directory or a hub id; a clear error when neither can be loaded."""
    local = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or local.exists()
    if looks_local:
        if not local.is_dir():
            raise ValueError(f"model.path {path!r} does not exist; give a model directory, a hub id, or \"toy\"")
        if not (local / "config.json").is_file():
            raise ValueError(f"model.path {path!r} has no config.json: it is not a transformers model directory")
        return str(local.resolve())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.path {path!r} is not a local directory and could not be loaded as a hub id ({e}); "
            "on an offline machine use a local path or \"toy\""
        ) from None
    return path


def build_world(cfg: Config, log=print) -> World:
    from transformers import AutoConfig, AutoTokenizer

    from probes.probe import load_probe

    toy = None
    if cfg.model.path == "toy" or any(p.path == "toy" for p in cfg.scorer.probes):
        from pipeline.toy import ensure_toy_world

        toy = ensure_toy_world(cfg.toy, log)
    model_path = str(toy.model_dir) if cfg.model.path == "toy" else resolve_model_path(cfg.model.path)
    model_cfg = AutoConfig.from_pretrained(model_path)

    probe_paths, names = [], []
    for spec in cfg.scorer.probes:
        stem = str(toy.probe_stem) if spec.path == "toy" else spec.path
        probe = load_probe(stem)  # raises ValueError naming the file and what is wrong
        probe.check_fits(model_cfg.num_hidden_layers, model_cfg.hidden_size, model_name=f"model {cfg.model.path!r}")
        probe_paths.append((stem, spec.aggregation))
        names.append(probe.name)
    if cfg.shaping.probe is not None and cfg.shaping.probe not in names:
        raise ValueError(f"shaping.probe={cfg.shaping.probe!r} is not among the loaded probes {names}")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.task.dataset is not None:
        prompts, eval_prompts = load_prompt_file(cfg.task.dataset), None
    else:
        max_operand = cfg.toy.max_operand
        prompts = arithmetic_prompts(cfg.task.num_prompts, max_operand, seed=cfg.pipeline.seed + 100)
        eval_prompts = arithmetic_prompts(cfg.task.eval_prompts, max_operand, seed=cfg.pipeline.seed + 200)
        if not cfg.task.eval_prompts:
            eval_prompts = None
    reward_fn = load_reward_fn(cfg.task.reward_fn)
    truth_fn = load_reward_fn(cfg.task.ground_truth_fn, "task.ground_truth_fn") if cfg.task.ground_truth_fn else None
    encode = lambda texts: [tokenizer(t)["input_ids"] for t in texts]  # noqa: E731
    prompt_ids = encode(prompts.prompts)
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + cfg.generator.max_new_tokens > cfg.generator.max_model_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompts (first: row {too_long[0]}) do not fit generator.max_model_len="
            f"{cfg.generator.max_model_len} with generator.max_new_tokens={cfg.generator.max_new_tokens}"
        )
    eval_labelled = None
    if cfg.eval.every:
        from probes.toolkit import load_labelled

        if cfg.eval.probe_data is not None:
            eval_labelled = load_labelled(cfg.eval.probe_data)
        else:
            from pipeline.toy import toy_labelled

            eval_labelled = toy_labelled(400, cfg.toy.max_operand, seed=cfg.toy.seed + 999)
    return World(model_path, probe_paths, names, tokenizer, pad_id, prompts, prompt_ids, eval_prompts,
                 encode(eval_prompts.prompts) if eval_prompts else [], reward_fn, truth_fn, eval_labelled)
