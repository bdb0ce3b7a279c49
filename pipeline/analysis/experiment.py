"""`probe-rl experiment`: several arms x several seeds of the same pipeline, then one report.

The experiment file (configs/experiment.toml) names a base config, the seeds, and arms as override
tables. All runs share one Ray instance and land in one directory, with `report.md` and PNG plots
(pipeline/analysis/report.py) written at the end.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.config import Config, ConfigError, _merge, load_config, parse_overrides, shipped_config


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    """Base run config, relative to the experiment file."""
    seeds: list[int] = [0]
    """Every arm runs once per seed: the RL seed (pipeline.seed, learner.seed) and, with vary_world, the toy world
    (toy.seed: another SFT model and other probes), so each seed is a world of its own."""
    vary_world: bool = True
    """Seeds also pick the toy world (toy.seed). False: one world, only the RL seed varies."""
    overrides: dict[str, Any] = {}
    """Config overrides (nested tables) shared by every arm, applied on the base before the arm's own."""
    arms: dict[str, dict[str, Any]]
    """Arm name -> config overrides (nested tables)."""
    default_arms: list[str] = []
    """Arms run when --arms is not given; empty: all."""

    @model_validator(mode="after")
    def _arms_exist(self) -> ExperimentConfig:
        unknown = [a for a in self.default_arms if a not in self.arms]
        if unknown:
            raise ValueError(f"default_arms names unknown arms {unknown}; defined: {sorted(self.arms)}")
        return self


def load_experiment(path: str | Path, arms: list[str] | None, seeds: list[int] | None,
                    overrides: list[str]) -> tuple[ExperimentConfig, dict[tuple[str, int], Config]]:
    """Parse the experiment file and validate every run's config up front (a bad arm fails before any run)."""
    path = shipped_config(Path(path))
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        exp = ExperimentConfig.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ConfigError(f"{path}: {e}") from None
    chosen = arms or exp.default_arms or list(exp.arms)
    unknown = [a for a in chosen if a not in exp.arms]
    if unknown:
        raise ConfigError(f"--arms {unknown} not defined in {path}; defined: {sorted(exp.arms)}")
    seeds = seeds if seeds else exp.seeds
    cli = parse_overrides(overrides)
    runs: dict[tuple[str, int], Config] = {}
    for seed in seeds:
        for arm in chosen:
            seeded = {"pipeline": {"seed": seed}, "learner": {"seed": seed}} | ({"toy": {"seed": seed}} if exp.vary_world else {})
            # later layers win: the file's shared overrides, the arm's, the seed's, the command line's
            over = reduce(_merge, (exp.overrides, exp.arms[arm], seeded, cli), {})
            try:
                runs[(arm, seed)] = load_config(path.parent / exp.base, over)
            except ConfigError as e:
                raise ConfigError(f"arm {arm!r}: {e}") from None
    exp.seeds = seeds
    return exp, runs


def world_key(cfg: Config) -> str:
    """What a run's `World` depends on: arms that agree on it share one (built once per experiment). The shaping
    section belongs to it: the probes a run loads depend on it (shaping.monitor = "random_direction" adds a control
    probe; shaping.probe and shaping.kind are checked against the loaded probes)."""
    return cfg.model_dump_json(include={"model", "toy", "task", "scorer", "eval", "pipeline", "shaping"})


def run_experiment(exp_path: str, runs: dict[tuple[str, int], Config], out_dir: str | None, log: Callable[[str], None] = print,
                   vary_world: bool = True, keep_checkpoints: bool = False) -> Path:
    """Every run not finished in `out_dir`, then the report. A run counts as finished when its folder holds its
    summary, or when the folder's `data/` (a report's exported data, e.g. committed from another machine) holds it:
    so an experiment longer than a session resumes on a fresh clone from its committed report. The report and
    `data/` are rewritten after every run, so they hold every run that finished even if the experiment is cut off;
    a finished run's checkpoints are removed unless `keep_checkpoints` (the report reads none of them)."""
    import shutil

    import ray

    from pipeline.analysis.report import load_exported, load_runs, write_report
    from pipeline.loop.driver import run
    from pipeline.loop.remote import init_ray
    from pipeline.loop.run_dir import finished, restart_run_dir
    from pipeline.worlds.world import build_world

    first = next(iter(runs.values()))
    root = Path(out_dir or Path(first.run.output_dir) / f"experiment-{datetime.now():%Y%m%d-%H%M%S}")
    root.mkdir(parents=True, exist_ok=True)
    log(f"experiment: {len(runs)} runs -> {root}")
    exported = {(arm, r["seed"]): r for arm, rs in load_exported(root).items() for r in rs}
    order = [(arm, seed) for arm, seed in runs]

    def report() -> bool:
        data = load_runs(root, order)
        for (arm, seed), r in exported.items():
            if (arm, seed) in runs and all(x["seed"] != seed for x in data.get(arm, [])):
                data.setdefault(arm, []).append(r)
        done = [k for k in order if any(x["seed"] == k[1] for x in data.get(k[0], []))]
        if done:
            write_report(root, exp_path, done, vary_world=vary_world, data=data, model=first.model.path)
        return bool(done)

    worlds: dict[str, Any] = {}
    try:
        for i, ((arm, seed), cfg) in enumerate(runs.items(), 1):
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={
                "output_dir": str(root), "name": f"{arm}-seed{seed}", "progress": False})})
            if finished(root / f"{arm}-seed{seed}") or (arm, seed) in exported:
                log(f"[{i}/{len(runs)}] {arm} seed {seed}: finished before, kept")  # rerun the same --out to resume
                continue
            if not ray.is_initialized():  # only when something is left to run
                init_ray(max(runs.values(), key=lambda c: c.reserved_cpus()))
            key = world_key(cfg)
            world = worlds.get(key) or build_world(cfg, log)
            worlds[key] = world
            run_dir = restart_run_dir(cfg)  # a run cut off before starts again
            start = time.perf_counter()
            summary = run(cfg, run_dir, world, log=lambda *_: None)
            log(f"[{i}/{len(runs)}] {arm} seed {seed}: {time.perf_counter() - start:.0f}s, "
                f"task reward {summary['task_reward_first_steps']:.3f} -> {summary['task_reward_last_steps']:.3f}")
            if not keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            report()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if not report():
        raise ValueError(f"no finished runs under {root}")
    log(f"report: {root / 'report.md'}")
    return root
