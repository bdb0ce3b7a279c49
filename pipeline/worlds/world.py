"""Everything a run needs before any actor starts: model path, tokenizer, prompts, reward, probes.

`build_world` resolves the model (building the toy world if asked), tokenizes the prompt set and
checks every probe against the model's shape, so bad input fails here, early, with a message that
says what to change, before Ray, vLLM or DeepSpeed start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.worlds.pretrained import ensure_packaged_model, ensure_packaged_probe, is_packaged
from pipeline.worlds.tasks import (
    GroundTruthFn,
    PromptSet,
    RewardFn,
    arithmetic_prompts,
    check_vocabulary,
    load_prompt_file,
    load_reward_fn,
    prompt_encoder,
    prompt_key,
    task_fn_arguments,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from pipeline.worlds.toy import ToyWorld
    from probes.probe import LinearProbe
    from probes.text import TextMonitor
    from probes.toolkit import Labelled


@dataclass(frozen=True)
class GeneratorProbe:
    """A probe read inside the generators' sampling pass (pipeline/transport/vllm_probes.py)."""

    name: str  # its reading's name in the tables: the probe's own, or `<name>@gen` when the scorers read it too
    stem: str
    aggregation: str | None
    layer: int
    twin: str | None = None  # the name of the scorers' reading of the same probe, if any


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
    generator_probes: list[GeneratorProbe] = field(default_factory=list)  # probes read in the sampling pass
    encode: Callable[[list[str]], list[list[int]]] | None = None  # prompt texts -> ids, as the run encodes them
    reward_args: tuple[str, ...] = ()  # keyword arguments the reward function takes (tasks.task_fn_arguments)
    truth_args: tuple[str, ...] = ()  # and the ground-truth function
    text_monitor: object = None  # probes.text.TextMonitor (shaping.text_monitor): reads the completion's tokens only

    def reward(self, texts: list[str], answers: list[str], rows: list[int], held_out: bool = False) -> list[float]:
        """task.reward_fn on completions of prompts `rows` (of the RL prompts, or of the held-out ones)."""
        prompts = self.eval_prompts if held_out else self.prompts
        return self.reward_fn(texts, answers, **prompts.arguments(self.reward_args, rows))

    def truth(self, texts: list[str], answers: list[str], rows: list[int], held_out: bool = False) -> list[str]:
        """task.ground_truth_fn on completions of prompts `rows`, likewise."""
        prompts = self.eval_prompts if held_out else self.prompts
        return self.ground_truth_fn(texts, answers, **prompts.arguments(self.truth_args, rows))

    @property
    def column_names(self) -> list[str]:
        """Every probe reading in the scored table, in column order: the scorers' probes, then the generators'."""
        return self.probe_names + [g.name for g in self.generator_probes]

    def probe_stem(self, name: str) -> tuple[str, str | None]:
        """(stem, aggregation) of the probe behind reading `name`, wherever it is read."""
        if name in self.probe_names:
            return self.probe_paths[self.probe_names.index(name)]
        g = next(g for g in self.generator_probes if g.name == name)
        return g.stem, g.aggregation

    def evaluated_probes(self) -> list[tuple[str, str | None]]:
        """(stem, aggregation) of each distinct probe, for the evaluator: the scorers' and those only read on the
        generators."""
        return self.probe_paths + [(g.stem, g.aggregation) for g in self.generator_probes if g.twin is None]

    def prompts_for_step(self, step: int, num: int, seed: int) -> pa.Table:
        """The step's prompts: a seeded draw without replacement, the same on every run with this seed."""
        from pipeline.data.schema import PROMPT_SCHEMA

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


HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"  # "name" or "org/name", as the hub names them
HUB_REACH_S = 3.0  # how long to try the hub's host before calling the machine offline


def hub_reachable(timeout_s: float = HUB_REACH_S) -> bool:
    """Whether the hub's host (HF_ENDPOINT, default huggingface.co) accepts a connection within `timeout_s`."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def resolve_model_path(path: str) -> str:
    """A local model directory or a hub id; a clear error when neither can be loaded. A value that can only be a
    path (a leading /, . or ~, more than one /, or a first part that is a local folder) is never sent to the hub; a
    hub id is read from the local cache first, and an unreachable hub is said in one line, fast."""
    import os
    import re

    local = Path(path).expanduser()
    looks_local = (path.startswith(("/", ".", "~")) or local.exists() or not re.fullmatch(HUB_ID, path)
                   or Path(path.split("/")[0]).is_dir())
    if looks_local:
        if not local.is_dir():
            raise ValueError(f"model.path {path!r} does not exist; give a model directory, a hub id, or \"toy\"")
        if not (local / "config.json").is_file():
            raise ValueError(f"model.path {path!r} has no config.json: it is not a transformers model directory")
        if not any(local.glob("*.safetensors")) and not any(local.glob("pytorch_model*.bin")):
            raise ValueError(f"model.path {path!r} has a config.json but no weights (*.safetensors): save the model "
                             "there with save_pretrained, or point model.path at the folder that has them")
        return str(local.resolve())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, local_files_only=True)  # in the hub cache already: no network needed
        return path
    except (OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not hub_reachable():
        why = ("HF_HUB_OFFLINE is set" if offline else f"the hub did not answer within {HUB_REACH_S:.0f} s (on a "
               "machine without network, set HF_HUB_OFFLINE=1)")
        raise ValueError(f"model.path {path!r} is not a local directory nor in the hub cache, and {why}: download it "
                         "where there is network (`huggingface-cli download` fills the cache), or give a local model "
                         "directory (or \"toy\")")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.path {path!r} is not a local directory and could not be loaded as a hub id "
                         f"({first})") from None
    return path


def check_files(cfg: Config) -> list[str]:
    """What `--dry-run` checks, building nothing: with a model of the user's own (a folder or a hub id) and no
    built probe, the whole world as a run loads it (model config, tokenizer, dataset, reward and ground-truth
    functions with their arguments, probes against the model, prompt lengths); with the toy or a packaged model,
    which a first run builds, the user's files alone (dataset, functions, probe files, labelled data). Returns
    what was checked; raises ValueError naming what to change."""
    from probes.probe import load_probe

    built = [p.path for p in cfg.scorer.probes if p.path.split(":")[0] in ("toy", "smollm2")]
    if cfg.model.path != "toy" and not is_packaged(cfg.model.path) and not built:
        world = build_world(cfg, log=lambda line: None)
        return [f"model {world.model_path}", f"{len(world.prompts)} prompts"
                + (f" and {len(world.eval_prompts)} held out" if world.eval_prompts else ""),
                f"reward {cfg.task.reward_fn}", *(f"probe {p}" for p in world.probe_names)]
    prompts, eval_prompts = prompt_sets(cfg)
    done = [f"{len(prompts)} prompts" + (f" and {len(eval_prompts)} held out" if eval_prompts else "")]
    for key in ("reward_fn", "ground_truth_fn"):
        if dotted := getattr(cfg.task, key):
            task_fn_arguments(load_reward_fn(dotted, f"task.{key}", cfg.task.python_path), f"task.{key}", prompts)
            done.append(f"{key.split('_fn')[0].replace('_', ' ')} {dotted}")
    for p in cfg.scorer.probes:
        if p.path not in built:
            load_probe(p.path)
            done.append(f"probe {p.path}")
    if cfg.eval.probe_data:
        from pipeline.worlds.tasks import load_labelled

        done.append(f"{len(load_labelled(cfg.eval.probe_data))} labelled completions")
    return done


def build_world(cfg: Config, log: Callable[[str], None] = print) -> World:
    from transformers import AutoConfig, AutoTokenizer

    toy = None
    user_model = cfg.model.path != "toy" and not is_packaged(cfg.model.path)
    if user_model:  # checked first: a wrong path fails before any world is built
        model_path = resolve_model_path(cfg.model.path)
    if cfg.model.path == "toy" or any(p.path.split(":")[0] == "toy" for p in cfg.scorer.probes):
        from pipeline.worlds.toy import ensure_toy_world

        toy = ensure_toy_world(cfg.toy, log)
    if cfg.model.path == "toy":
        model_path = str(toy.model_dir)
    elif not user_model:
        model_path = str(ensure_packaged_model(cfg.model.path, cfg.toy.cache_dir, log))
    model_cfg = AutoConfig.from_pretrained(model_path)
    probe_paths, names, generator_probes = load_probes(cfg, toy, model_cfg, model_path, log)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_vocabulary(tokenizer, model_cfg, cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, eval_prompts = prompt_sets(cfg)
    reward_fn = load_reward_fn(cfg.task.reward_fn, python_path=cfg.task.python_path)
    truth_fn = (load_reward_fn(cfg.task.ground_truth_fn, "task.ground_truth_fn", cfg.task.python_path)
                if cfg.task.ground_truth_fn else None)
    reward_args = task_fn_arguments(reward_fn, "task.reward_fn", prompts)
    truth_args = task_fn_arguments(truth_fn, "task.ground_truth_fn", prompts) if truth_fn else ()
    lacking = sorted({*reward_args, *truth_args} - {"prompts", *(eval_prompts.columns if eval_prompts else {})})
    if eval_prompts is not None and lacking:
        raise ValueError(f"the reward or ground-truth function takes the columns {lacking}, which the held-out prompts "
                         "(task.eval_dataset) do not have; add them there")
    encode = prompt_encoder(tokenizer, cfg.task.chat_template, cfg.task.system_prompt, cfg.model.path)
    prompt_ids = encode(prompts.prompts)
    eval_ids = encode(eval_prompts.prompts) if eval_prompts else []
    too_long = [i for i, ids in enumerate(prompt_ids + eval_ids)
                if len(ids) + cfg.generator.max_new_tokens > cfg.generator.max_model_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompts (first: row {too_long[0]}) do not fit generator.max_model_len="
            f"{cfg.generator.max_model_len} with generator.max_new_tokens={cfg.generator.max_new_tokens}"
        )
    eval_labelled = None
    if cfg.eval.every:
        from pipeline.worlds.tasks import load_labelled

        if cfg.eval.probe_data is not None:
            eval_labelled = load_labelled(cfg.eval.probe_data)
        elif cfg.model.path != "toy":  # a packaged model: the held-out rows of its probe's labelled set
            eval_labelled = packaged_held_out(cfg, model_path, model_cfg, log)
        else:  # the toy's probe-eval part: no prompt of it is in the probes' training data or among the RL prompts
            from pipeline.worlds.toy import toy_labelled

            eval_labelled = toy_labelled(400, cfg.toy.max_operand, seed=cfg.toy.seed + 999, part="probe_eval",
                                         cfg=cfg.toy)
    monitor = load_text_monitor_for(cfg, toy, model_path, model_cfg, tokenizer, log)
    return World(model_path, probe_paths, names, tokenizer, pad_id, prompts, prompt_ids, eval_prompts, eval_ids,
                 reward_fn, truth_fn, eval_labelled, generator_probes, encode, reward_args, truth_args, monitor)


def packaged_held_out(cfg: Config, model_path: str, model_cfg: PretrainedConfig,
                      log: Callable[[str], None]) -> Labelled:
    """The held-out side (split_by_prompt, as the probe's fit made it) of the labelled set of the first packaged probe
    in scorer.probes: rows its probe never trained on, in the completions' own distribution."""
    from pipeline.worlds.pretrained import packaged_labelled
    from probes.toolkit import split_by_prompt

    spec = next(p for p in cfg.scorer.probes if p.path.partition(":")[0] == cfg.model.path)
    name = spec.path.partition(":")[2] or "hack"
    stem = packaged_probe_stem(cfg, model_path, model_cfg, name, log)
    data = packaged_labelled(stem, name, cfg.task.prompt_template, cfg.toy.max_operand, cfg.toy.seed)
    return data.subset(split_by_prompt(data, 0.2, cfg.toy.seed)[1])


def packaged_probe_stem(cfg: Config, model_path: str, model_cfg: PretrainedConfig, name: str,
                        log: Callable[[str], None]) -> Path:
    """The packaged model's probe `name`, fitted once at its middle layer for this run's prompts
    (pipeline/worlds/pretrained.py: ensure_packaged_probe)."""
    return ensure_packaged_probe(Path(model_path), name, model_cfg.num_hidden_layers // 2, cfg.task.prompt_template,
                                 cfg.task.system_prompt, cfg.task.chat_template, cfg.toy.max_operand, cfg.toy.seed, log)


def load_text_monitor_for(cfg: Config, toy: ToyWorld | None, model_path: str, model_cfg: PretrainedConfig,
                          tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print) -> TextMonitor | None:
    """The text monitor of shaping.text_monitor (None when unset): "toy[:<name>]" or "<packaged>:<name>" fitted here
    on that probe's labelled completions with its held-out split (a few seconds; both held-out AUROCs logged),
    otherwise loaded from its stem and checked against the tokenizer."""
    from probes.text import fit_text_monitor, load_text_monitor

    path = cfg.shaping.text_monitor
    if path is None:
        return None
    source, _, name = path.partition(":")
    if source == "toy":
        from pipeline.worlds.toy import TOY_PROBES, toy_labelled

        if cfg.model.path != "toy":
            raise ValueError(f"shaping.text_monitor: {path!r} reads the toy's tokens, but model.path is "
                             f"{cfg.model.path!r}; name a monitor of this model")
        name = name or "hack"
        if name not in TOY_PROBES:
            raise ValueError(f"shaping.text_monitor: {path!r} names no toy probe; the toy has {sorted(TOY_PROBES)}")
        data = toy_labelled(cfg.toy.probe_samples // 2, cfg.toy.max_operand, seed=cfg.toy.seed + 4,
                            shapes=TOY_PROBES[name], cfg=cfg.toy)
        probe_stem = toy.probe_stems[name]
    elif is_packaged(source):
        from pipeline.worlds.pretrained import packaged_labelled

        if cfg.model.path != source:
            raise ValueError(f"shaping.text_monitor: {path!r} is fitted on model {source!r}, but model.path is "
                             f"{cfg.model.path!r}")
        name = name or "hack"
        probe_stem = packaged_probe_stem(cfg, model_path, model_cfg, name, log)
        data = packaged_labelled(probe_stem, name, cfg.task.prompt_template, cfg.toy.max_operand, cfg.toy.seed)
    else:
        monitor = load_text_monitor(path)
        if monitor.vocab_size < len(tokenizer):
            raise ValueError(f"shaping.text_monitor {path}: it covers {monitor.vocab_size} token ids but the tokenizer "
                             f"of model.path {cfg.model.path!r} has {len(tokenizer)}: it was fitted for another model")
        return monitor
    from probes.probe import load_probe

    monitor, metrics = fit_text_monitor(data, tokenizer, f"{name}_text", seed=cfg.toy.seed)
    probe_auroc = load_probe(probe_stem).notes.get("held_out", {}).get("auroc")
    monitor.notes["probe_held_out_auroc"] = probe_auroc
    log(f"text monitor {path!r} (token counts, same labelled rows and split as probe {name!r}): held-out AUROC "
        f"{metrics['auroc']:.3f} against the probe's {probe_auroc:.3f}" if probe_auroc is not None else
        f"text monitor {path!r}: held-out AUROC {metrics['auroc']:.3f}")
    return monitor



def load_probes(cfg: Config, toy: ToyWorld | None, model_cfg: PretrainedConfig, model_path: str | None = None,
                log: Callable[[str], None] = print) -> tuple[list[tuple[str, str | None]], list[str], list[GeneratorProbe]]:
    """(stem, aggregation) and name of every probe the scorers read, and the probes the generators read; each
    checked against the model, the shaping probe also against what its shaping kind does with it. "toy" is the
    toy's hack probe, "toy:<name>" another; "smollm2" (or "smollm2:hack") a hack probe fitted once on the packaged
    model's own activations at its middle layer (pipeline/worlds/pretrained.py: ensure_packaged_probe)."""
    from probes.probe import load_probe

    probe_paths, probes, on_generator = [], [], []
    for spec in cfg.scorer.probes:
        source, _, name = spec.path.partition(":")
        if source == "toy":
            if (name or "hack") not in toy.probe_stems:
                raise ValueError(f"scorer.probes: {spec.path!r} names no toy probe; the toy has {sorted(toy.probe_stems)}")
            stem = str(toy.probe_stems[name or "hack"])
        elif is_packaged(source):
            if cfg.model.path != source:
                raise ValueError(f"scorer.probes: {spec.path!r} is fitted on model {source!r}, but model.path is "
                                 f"{cfg.model.path!r}; set model.path = {source!r} or give another probe")
            stem = str(packaged_probe_stem(cfg, model_path, model_cfg, name or "hack", log))
        else:
            stem = spec.path
        probe = load_probe(stem)  # raises ValueError naming the file and what is wrong
        probe.check_fits(model_cfg.num_hidden_layers, model_cfg.hidden_size, model_name=f"model {cfg.model.path!r}")
        if (spec.read or ("generator" if cfg.scorer.model == "generator" else "scorer")) == "generator":
            on_generator.append((stem, spec.aggregation, probe))
        else:
            probe_paths.append((stem, spec.aggregation))
            probes.append(probe)
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer.probes: the scorers would read two probes named the same ({names}); list each once")
    generator_probes = []
    for stem, aggregation, probe in on_generator:
        twin = next((n for n, (st, _) in zip(names, probe_paths, strict=True) if st == stem), None)
        name = f"{probe.name}@gen" if probe.name in names else probe.name
        if name in [g.name for g in generator_probes]:
            raise ValueError(f"scorer.probes: probe {probe.name!r} is read on the generators twice; list it once")
        generator_probes.append(GeneratorProbe(name, stem, aggregation, probe.layer, twin))
        probes.append(probe)
    every = names + [g.name for g in generator_probes]
    if cfg.shaping.probe is not None and cfg.shaping.probe not in every:
        raise ValueError(f"shaping.probe={cfg.shaping.probe!r} is not among the loaded probes {every}")
    shaping_name = cfg.shaping.probe or (every[0] if every else None)
    if cfg.shaping.kind in ("loss", "ablate"):
        check_shaping_probe(cfg.shaping.kind, probes[every.index(shaping_name)], model_cfg)
    g = next((g for g in generator_probes if g.name == shaping_name), None)
    if cfg.scorer.retrain_every and g is not None and g.twin is None:
        raise ValueError(f"scorer.retrain_every refits the shaping probe on a scorer's activations, but probe "
                         f"{shaping_name!r} is read only on the generators: list it in scorer.probes a second time "
                         "with read = \"scorer\" (its refit then reaches both readings)")
    if cfg.shaping.monitor == "random_direction":
        if shaping_name not in names:
            raise ValueError(f"shaping.monitor = \"random_direction\" replaces probe {shaping_name!r} read on the "
                             "scorers: read it there (read = \"scorer\")")
        stem, aggregation = probe_paths[names.index(shaping_name)]
        control = random_direction_probe(probes[every.index(shaping_name)], cfg.toy.seed,
                                         Path(cfg.toy.cache_dir).expanduser() / "random_probes")
        probe_paths.append((str(control), aggregation))
        names.append(f"{shaping_name}_random")
    if generator_probes and cfg.shaping.kind == "ablate":
        raise ValueError("shaping.kind = \"ablate\" edits the generators' residual stream, which generator-read probes "
                         "would read after the edit: read the probes on the scorers (read = \"scorer\")")
    return probe_paths, names, generator_probes


def random_direction_probe(probe: LinearProbe, seed: int, root: Path) -> Path:
    """The control for `probe`: a uniformly random direction of the same norm, same layer, bias and aggregation,
    named `<name>_random`, drawn from `seed` (the world's) and the probe's own weights, so a world always gets the
    same one. Written once under `root`; returns its stem."""
    import hashlib

    import torch

    from probes.probe import LinearProbe

    digest = hashlib.sha256(probe.weight.numpy().tobytes() + probe.bias.numpy().tobytes()).hexdigest()[:12]
    stem = root / f"{probe.name}_random-{digest}-seed{seed}"
    if not stem.with_suffix(".json").is_file():
        g = torch.Generator().manual_seed(int(digest[:8], 16) ^ seed)
        direction = torch.randn(probe.hidden_size, generator=g)
        weight = direction / direction.norm() * probe.weight.float().norm()
        LinearProbe(f"{probe.name}_random", probe.layer, weight, probe.bias.clone(), probe.aggregation,
                    notes={"control": "random direction", "of": probe.name, "seed": seed}).save(stem)
    return stem


def check_shaping_probe(kind: str, probe: LinearProbe, model_cfg: PretrainedConfig) -> None:
    """A probe that acts on the policy's own activations must be one the learner can hook (and, to ablate, a
    direction: a zero weight has none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from probes.hooks import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cfg)
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise ValueError(f"shaping.kind = {kind!r} needs probe {probe.name!r} on a layer the learner can hook: {e}") from None
    if not 0 <= probe.layer < len(layers):
        raise ValueError(f"shaping.kind = {kind!r}: probe {probe.name!r} reads layer {probe.layer}, but the learner's "
                         f"model has decoder layers 0..{len(layers) - 1}")
    if kind == "ablate" and not float(probe.weight.norm()) > 0:
        raise ValueError(f"shaping.kind = \"ablate\": probe {probe.name!r} has a zero weight, so there is no direction "
                         "to project out; choose another probe with shaping.probe")


def prompt_sets(cfg: Config) -> tuple[PromptSet, PromptSet | None]:
    """RL prompts and held-out eval prompts, sharing nothing: the toy's parts of the number space (neither is in its
    SFT data), or a user dataset with task.eval_dataset, or its task.eval_fraction split off by prompt."""
    t = cfg.task
    if t.dataset is None:
        if t.num_prompts < cfg.pipeline.prompts_per_step:
            raise ValueError(f"task.num_prompts={t.num_prompts} is fewer than the pipeline.prompts_per_step="
                             f"{cfg.pipeline.prompts_per_step} a step draws; raise the one or lower the other")
        prompts = arithmetic_prompts(t.num_prompts, cfg.toy.max_operand, seed=cfg.pipeline.seed + 100, part="rl",
                                     template=t.prompt_template)
        if not t.eval_prompts:
            return prompts, None
        return prompts, arithmetic_prompts(t.eval_prompts, cfg.toy.max_operand, seed=cfg.pipeline.seed + 200, part="eval",
                                           template=t.prompt_template)
    prompts = load_prompt_file(t.dataset)
    need = cfg.pipeline.prompts_per_step
    if len(prompts.prompts) < need:  # a step draws its prompts without replacement: refuse before any work
        raise ValueError(f"task.dataset {t.dataset} holds {len(prompts.prompts)} prompts, fewer than the "
                         f"pipeline.prompts_per_step={need} a step draws; lower pipeline.prompts_per_step or add prompts")
    if t.eval_dataset is not None:
        held = load_prompt_file(t.eval_dataset, "task.eval_dataset")
        shared = {prompt_key(p) for p in held.prompts} & {prompt_key(p) for p in prompts.prompts}
        if shared:
            raise ValueError(f"task.eval_dataset shares {len(shared)} prompts with task.dataset (first: "
                             f"{next(iter(shared))!r}); held-out prompts must not be trained on")
        return prompts, held
    if not t.eval_fraction:
        return prompts, None
    train, held = split_held_out(prompts, t.eval_fraction, t.dataset)
    if len(train.prompts) < need:
        raise ValueError(f"task.eval_fraction={t.eval_fraction} leaves {len(train.prompts)} prompts of task.dataset "
                         f"{t.dataset} to train on, fewer than pipeline.prompts_per_step={need}; lower either")
    return train, held


def split_held_out(prompts: PromptSet, fraction: float, where: str) -> tuple[PromptSet, PromptSet]:
    """Every prompt goes to the held-out part by a hash of its text, so repeats of a prompt stay on one side; a
    small dataset keeps at least its lowest-hash prompt held out."""
    import hashlib

    def rank(text: str) -> float:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64

    ranks = [rank(prompt_key(p)) for p in prompts.prompts]
    cut = max(fraction, min(ranks))
    train = [i for i, r in enumerate(ranks) if r > cut]
    test = [i for i, r in enumerate(ranks) if r <= cut]
    if not train or not test:
        raise ValueError(f"task.eval_fraction={fraction} leaves {len(train)} prompts to train on and {len(test)} held "
                         f"out in {where}; change it, or give task.eval_dataset")
    return prompts.subset(train), prompts.subset(test)
