"""The driver: one loop that wires generators, scorers, the rewarder and the learner.

Read `train_loop` top to bottom: launch generation (and its scoring) up to `max_staleness` steps
ahead, take the oldest batch, compute shaped rewards, take one learner step, push the new weights to
every generator, log a metrics row. Generation for later steps runs on the generator actors while
the learner trains, so the two overlap; the version every rollout came from is tracked and the
staleness of each batch is checked and logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, dump_toml
from pipeline.metrics import ParquetSink, StageTimer
from pipeline.rewarder import Rewarder
from pipeline.world import World, build_world


@dataclass
class Roles:
    generators: list[Any]
    scorers: list[Any]
    learners: list[Any]
    evaluator: Any = None
    probe_names: list[str] = field(default_factory=list)
    new_generator: Any = None  # (index) -> a fresh generator actor, to replace a dead one
    new_scorer: Any = None  # (index) -> a fresh scorer actor
    probe_overrides: dict[str, dict] = field(default_factory=dict)  # probes refit during the run
    weights_ref: Any = None  # the last weights pushed to generators (None: the initial ones)
    active_scorers: int = 0  # scorers that get new work; those past it are draining (0: all)
    groups: list[Any] = field(default_factory=list)  # the roles' placement groups, removed at the end


@dataclass
class Chunk:
    """One slice of a step's prompts: which generator and scorer got it, and the refs of their results."""

    prompts: pa.Table
    seed: int
    generator: int
    scorer: int
    table: Any = None  # generator's rollout table ref
    gen_stats: Any = None
    scored: Any = None  # scorer's scored table ref
    score_stats: Any = None


@dataclass
class InFlight:
    """One step's rollouts on their way through generation and scoring."""

    step: int
    chunks: list[Chunk]


def prepare(cfg: Config, log=print) -> tuple[Path, World]:
    """Check every input and build what is missing; user mistakes raise ValueError before Ray starts."""
    world = build_world(cfg, log)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    log(f"run directory: {run_dir}")
    return run_dir, world


def run(cfg: Config, run_dir: Path, world: World, log=print, resume_from: Path | None = None) -> dict:
    """Start the roles on Ray, train, write summary.json and return the summary.

    With `resume_from` (a checkpoint of this run), the learner restores weights and optimizer state, the
    generators receive those weights before they generate, and training continues at the next step.
    """
    import ray

    owns_ray = not ray.is_initialized()  # a caller (a test, a notebook) may hold a Ray instance already
    if owns_ray:
        init_ray(cfg)
    roles = None
    try:
        roles = start_roles(cfg, world, log)
        start = restore(cfg, roles, resume_from, log) if resume_from is not None else 0
        summary = train_loop(cfg, world, roles, run_dir, log, start_version=start)
    finally:
        if owns_ray:
            ray.shutdown()
        elif roles is not None:  # leave a caller's Ray instance as we found it
            from ray.util.placement_group import remove_placement_group

            for actor in roles.generators + roles.scorers + roles.learners + [roles.evaluator]:
                if actor is not None:
                    ray.kill(actor)
            for group in roles.groups:
                remove_placement_group(group)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory (one with its state file written last)."""
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/probe_rl_state.json"))
    if not done:
        raise ValueError(f"{run_dir} has no checkpoint to resume from (set learner.checkpoint_every to save some)")
    return done[-1]


def restore(cfg: Config, roles: Roles, checkpoint: Path, log=print) -> int:
    """Load a checkpoint into every learner rank and push its weights to generators; returns its version."""
    from pipeline.remote import wait

    t = cfg.pipeline.timeout_s
    versions = wait([lr.load_checkpoint.remote(str(checkpoint)) for lr in roles.learners], "learner (resume)", t)
    roles.weights_ref, syncs = push_weights(cfg, roles, versions[0])
    wait(syncs, "generator (resume weights)", t)
    log(f"resumed from {checkpoint} at version {versions[0]}")
    return versions[0]


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser() / name
    if (run_dir / "metrics.parquet").exists():
        raise ValueError(f"run directory {run_dir} already holds a run; choose another --run.name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def init_ray(cfg: Config) -> None:
    import ray

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")  # set inside a submitted Ray job
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = (
        cfg.generator.num_workers * cfg.generator.num_cpus
        + cfg.scorer.num_workers * cfg.scorer.num_cpus
        + cfg.learner.num_ranks * cfg.learner.num_cpus
        + (cfg.eval.num_cpus if cfg.eval.every else 0)
    )
    # A local instance with exactly the CPUs the roles reserve (they share real cores) and no dashboard.
    # Ray 2.60 rewrites a loopback node address to the machine's own and listens on all interfaces; its
    # token authentication (on by default, token in ~/.ray/auth_token) is what keeps other hosts out.
    ray.init(num_cpus=math.ceil(need), include_dashboard=False, log_to_driver=True, configure_logging=False)


def start_roles(cfg: Config, world: World, log=print) -> Roles:
    from actors.generator import Generator
    from actors.scorer import Scorer
    from learner.learner import Learner
    from pipeline.remote import Resources, check_fits, free_port, make_actor, reserve, wait

    quiet = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    log(f"starting {cfg.generator.num_workers} generator(s), {cfg.scorer.num_workers} scorer(s), "
        f"{cfg.learner.num_ranks} learner rank(s)")
    g, s, lc, t = cfg.generator, cfg.scorer, cfg.learner, cfg.pipeline.timeout_s
    need = {"generator": (g.num_workers, Resources(g.num_cpus, g.num_gpus, g.memory_gib)),
            "scorer": (s.num_workers, Resources(s.num_cpus, s.num_gpus, s.memory_gib)),
            "learner": (lc.num_ranks, Resources(lc.num_cpus, lc.num_gpus, lc.memory_gib))}
    if cfg.eval.every:
        need["evaluator"] = (1, Resources(cfg.eval.num_cpus))
    check_fits([(role, n, res) for role, (n, res) in need.items()])  # fail fast, naming the role
    # One placement group per role: learner ranks packed together, generators and scorers spread. The
    # DeepSpeed rendezvous uses 127.0.0.1, so all learner ranks must share a node (multi-node: not yet).
    groups = {}
    try:
        for role, (n, res) in need.items():
            groups[role] = reserve(role, n, res, t, "PACK" if role == "learner" else "SPREAD")
    except ValueError:
        from ray.util.placement_group import remove_placement_group

        for placement in groups.values():
            remove_placement_group(placement.group)
        raise

    def new_generator(i: int):
        return make_actor(Generator, "generator", g.num_cpus, g.num_gpus, quiet, world.model_path, g, cfg.model.dtype,
                          cfg.pipeline.seed + i, placement=(groups["generator"], i), memory_gib=g.memory_gib)

    def new_scorer(i: int):
        # Scorers beyond the minimum (scaled up by backlog) are scheduled outside the role's group.
        placement = (groups["scorer"], i) if i < s.num_workers else None
        return make_actor(Scorer, "scorer", s.num_cpus, s.num_gpus, quiet, world.model_path, world.probe_paths, s,
                          lc.kl_coef > 0, cfg.model.dtype, world.pad_id, placement=placement, memory_gib=s.memory_gib)

    generators = [new_generator(i) for i in range(g.num_workers)]
    scorers = [new_scorer(i) for i in range(s.num_workers)]
    port = free_port()
    rows = cfg.pipeline.prompts_per_step * cfg.pipeline.group_size
    learners = [
        make_actor(Learner, "learner", lc.num_cpus, lc.num_gpus, quiet, world.model_path, lc, rows, r,
                   lc.num_ranks, "127.0.0.1", port, cfg.model.dtype, world.pad_id,
                   placement=(groups["learner"], r), memory_gib=lc.memory_gib)
        for r in range(lc.num_ranks)
    ]
    evaluator = None
    if cfg.eval.every:
        from actors.evaluator import ProbeEvaluator

        evaluator = make_actor(ProbeEvaluator, "evaluator", cfg.eval.num_cpus, 0, quiet, world.model_path,
                               world.probe_paths, world.eval_labelled, cfg.model.dtype, world.pad_id, cfg.pipeline.seed,
                               placement=(groups["evaluator"], 0))
    if evaluator is not None:
        wait(evaluator.ready.remote(), "evaluator (start-up)", t)
    wait([a.ready.remote() for a in learners], "learner (start-up)", t)
    wait([a.ready.remote() for a in scorers], "scorer (start-up)", t)
    wait([a.ready.remote() for a in generators], "generator (start-up)", t)
    return Roles(generators, scorers, learners, evaluator, world.probe_names, new_generator, new_scorer,
                 groups=[pl.group for pl in groups.values()])


def launch_step(cfg: Config, world: World, roles: Roles, step: int) -> InFlight:
    """Submit generation and scoring of one step's prompts; nothing here blocks.

    Prompts are cut into max(#generators, #scorers) chunks so that every worker of both kinds gets work;
    each scorer call takes its generator's table ref directly, without a round trip through the driver.
    """
    prompts = world.prompts_for_step(step, cfg.pipeline.prompts_per_step, cfg.pipeline.seed)
    num_scorers = roles.active_scorers or len(roles.scorers)
    num_chunks = max(len(roles.generators), num_scorers)
    bounds = np.linspace(0, prompts.num_rows, num_chunks + 1).astype(int)
    chunks = []
    for c in range(num_chunks):
        if bounds[c + 1] > bounds[c]:
            part = prompts.slice(bounds[c], bounds[c + 1] - bounds[c])
            seed = cfg.pipeline.seed * 1_000_003 + step * 101 + c
            chunks.append(submit_chunk(cfg, roles, Chunk(part, seed, c % len(roles.generators), c % num_scorers)))
    return InFlight(step, chunks)


def submit_chunk(cfg: Config, roles: Roles, chunk: Chunk, generate: bool = True) -> Chunk:
    if generate:
        gen = roles.generators[chunk.generator]
        chunk.table, chunk.gen_stats = gen.generate.options(num_returns=2).remote(
            chunk.prompts, cfg.pipeline.group_size, chunk.seed)
    chunk.scored, chunk.score_stats = roles.scorers[chunk.scorer].score.options(num_returns=2).remote(chunk.table)
    return chunk


def collect(cfg: Config, roles: Roles, flight: InFlight, weights: tuple[Any, int], log=print):
    """Wait for a step's scored tables; a dead generator or scorer is replaced and its chunks redone.

    Returns (scored table, generator stats, scorer stats, actors replaced). A chunk is only ever used once:
    a redone chunk replaces the lost one, so no rollout is lost or counted twice.
    """
    import ray

    from pipeline.remote import wait

    t = cfg.pipeline.timeout_s
    restarts = 0
    for attempt in range(cfg.pipeline.max_restarts + 1):
        try:
            scored = wait([c.scored for c in flight.chunks], "generator/scorer", t)
            return (pa.concat_tables(scored), wait([c.gen_stats for c in flight.chunks], "generator", t),
                    wait([c.score_stats for c in flight.chunks], "scorer", t), restarts)
        except ray.exceptions.RayActorError as e:
            if attempt == cfg.pipeline.max_restarts:
                raise RuntimeError(f"step {flight.step}: a worker died {attempt + 1} times (pipeline.max_restarts="
                                   f"{cfg.pipeline.max_restarts}): {e}") from None
            restarts += replace_dead(cfg, roles, weights, log)
            for chunk in flight.chunks:
                if not _ok(chunk.scored):
                    submit_chunk(cfg, roles, chunk, generate=not _ok(chunk.table))
    raise AssertionError("unreachable")


def _ok(ref: Any) -> bool:
    """The ref holds a value (waits for it if it is still being computed); False if its actor died."""
    import ray

    try:
        ray.get(ref)
        return True
    except ray.exceptions.RayActorError:
        return False


def replace_dead(cfg: Config, roles: Roles, weights: tuple[Any, int], log=print) -> int:
    """Replace every dead generator and scorer. New generators (and live scorers) load the current weights
    before they get any work; new scorers get any refit probes. Returns how many were replaced."""
    import ray

    from pipeline.remote import wait

    state_ref, version = weights
    replaced = 0
    for kind, actors, make in (("generator", roles.generators, roles.new_generator),
                               ("scorer", roles.scorers, roles.new_scorer)):
        for i, actor in enumerate(actors):
            try:
                ray.get(actor.ready.remote(), timeout=cfg.pipeline.timeout_s)
                continue
            except ray.exceptions.RayActorError:
                pass
            log(f"{kind} {i} died; starting a replacement (weights version {version})")
            actors[i] = new = make(i)
            wait(new.ready.remote(), f"{kind} (replacement start-up)", cfg.pipeline.timeout_s)
            if state_ref is not None and (kind == "generator" or cfg.scorer.model == "live"):
                wait(new.update_weights.remote(state_ref, version), f"{kind} (replacement weights)", cfg.pipeline.timeout_s)
            for name, tensors in roles.probe_overrides.items() if kind == "scorer" else ():
                wait(new.set_probe.remote(name, tensors), "scorer (replacement probe)", cfg.pipeline.timeout_s)
            replaced += 1
    return replaced


def train_loop(cfg: Config, world: World, roles: Roles, run_dir: Path, log=print, start_version: int = 0) -> dict:
    from pipeline.progress import progress_bar
    from pipeline.remote import wait

    p, t = cfg.pipeline, cfg.pipeline.timeout_s
    resumed = start_version > 0  # earlier rows stay; rows after the checkpoint are recomputed
    sink = ParquetSink(run_dir / "metrics.parquet", keep_until_step=start_version if resumed else None)
    eval_sink = ParquetSink(run_dir / "eval.parquet", keep_until_step=start_version if resumed else None)
    rewarder, retrainer, scaler = Rewarder(cfg, world), ProbeRetrainer(cfg, roles), ScorerScaler(cfg, roles, log)
    eval_start = greedy_accuracy(cfg, world, roles)
    log(f"greedy eval accuracy before training: {eval_start:.1%}" if eval_start is not None else "")
    if not resumed:
        probe_eval(cfg, roles, eval_sink, 0, None, None)
    pending: deque[InFlight] = deque()
    pending_syncs: list[Any] = []
    version, next_launch, samples = start_version, start_version + 1, previous_samples(run_dir, start_version)
    state_ref = roles.weights_ref
    bar = progress_bar(p.num_steps, "training", "step", cfg.run.progress)
    for step in range(start_version + 1, p.num_steps + 1):
        timer, wall_start = StageTimer(), time.time()
        # Keep generation (and scoring) up to max_staleness steps ahead of the learner.
        while next_launch <= min(p.num_steps, step + p.max_staleness):
            pending.append(launch_step(cfg, world, roles, next_launch))
            next_launch += 1
        flight = pending.popleft()
        with timer("wait_rollouts"):
            for ref in pending_syncs:
                _ok(ref)  # surfaces a failed update; a dead worker's replacement gets the weights anyway
            scored, gen_stats, score_stats, restarts = collect(cfg, roles, flight, (state_ref, version), log)
        staleness = version - min(scored.column("policy_version").to_pylist())
        assert 0 <= staleness <= p.max_staleness, f"step {step}: staleness {staleness} > {p.max_staleness}"
        with timer("reward"):
            batch, reward_metrics = rewarder(scored)
        with timer("scale"):
            reward_metrics.update(scaler(gen_stats, score_stats, pending, (state_ref, version)))
        with timer("learn"):
            train_stats = wait([lr.train_step.remote(batch) for lr in roles.learners], "learner", t)
        version = train_stats[0].version
        with timer("sync"):
            state_ref, pending_syncs = push_weights(cfg, roles, version)
        with timer("probe_retrain"):
            reward_metrics.update(retrainer(step, batch, rewarder.last_truth))
        if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0 and step < p.num_steps:
            with timer("checkpoint"):
                wait([lr.save_checkpoint.remote(str(run_dir / "checkpoints")) for lr in roles.learners], "learner", t)
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == p.num_steps):
            with timer("probe_eval"):
                reward_metrics.update(probe_eval(cfg, roles, eval_sink, step, state_ref, scored))
        row = step_metrics(step, version, staleness, reward_metrics, gen_stats, score_stats, train_stats, timer)
        row.update({"time/wall_start": wall_start, "time/wall_end": time.time(),  # for Ray timelines
                    "pipeline/restarts": restarts, "rollout/rows": scored.num_rows})
        sink.log(row)
        samples.append(rewarder.sample(batch, cfg.run.rollout_sample_per_step, step))
        write_samples(samples, run_dir)  # every step: a crash keeps what was sampled (small: a sample per step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['rollout/task_reward']:.3f}", kl=f"{row['learner/kl']:.4f}")
        log_step(row, log, quiet=not bar.disable)
    bar.close()
    for ref in pending_syncs:
        _ok(ref)
    final = wait([lr.save_checkpoint.remote(str(run_dir / "checkpoints")) for lr in roles.learners], "learner", t)[0]
    eval_end = greedy_accuracy(cfg, world, roles)
    return summarize(sink.rows, eval_start, eval_end, final, run_dir)


def write_samples(samples: list[pa.Table], run_dir: Path) -> None:
    tmp = run_dir / "rollouts.parquet.tmp"
    pq.write_table(pa.concat_tables(samples, promote_options="default"), tmp)
    tmp.replace(run_dir / "rollouts.parquet")


def previous_samples(run_dir: Path, up_to_step: int) -> list[pa.Table]:
    path = run_dir / "rollouts.parquet"
    if up_to_step == 0 or not path.exists():
        return []
    import pyarrow.compute as pc

    table = pq.read_table(path)
    return [table.filter(pc.less_equal(table.column("step"), up_to_step))]


def push_weights(cfg: Config, roles: Roles, version: int) -> tuple[Any, list[Any]]:
    """Publish the learner's weights once to the object store and queue them on every generator (and on
    live scorers). Actor calls run in order, so any later generate/score call sees the new version; the
    driver does not wait here, so the update overlaps the generation already in flight."""
    import ray

    from pipeline.remote import wait

    wire = wait([lr.get_weights.remote() for lr in roles.learners], "learner (weights)", cfg.pipeline.timeout_s)[0]
    assert wire.version == version, (wire.version, version)
    state_ref = ray.put(wire)
    targets = roles.generators + (roles.scorers if cfg.scorer.model == "live" else [])
    return state_ref, [a.update_weights.remote(state_ref, version) for a in targets]


class ProbeRetrainer:
    """Every `scorer.retrain_every` steps, refit the shaping probe on recent on-policy rollouts labelled by
    the task's ground truth (1 = "hack") and hand it to every scorer (and the evaluator)."""

    def __init__(self, cfg: Config, roles: Roles) -> None:
        self.cfg, self.roles = cfg, roles
        self.window: deque[tuple[pa.Table, np.ndarray]] = deque(maxlen=cfg.scorer.retrain_window)

    def __call__(self, step: int, batch: pa.Table, truth: np.ndarray | None) -> dict[str, float]:
        from pipeline.remote import wait
        from pipeline.schema import ROLLOUT_SCHEMA

        every = self.cfg.scorer.retrain_every
        if not every or truth is None:
            return {}
        self.window.append((batch.select(ROLLOUT_SCHEMA.names), (truth == "hack").astype(int)))
        if step % every:
            return {}
        table = pa.concat_tables([b for b, _ in self.window])
        labels = np.concatenate([y for _, y in self.window])
        if labels.min() == labels.max():
            return {"scorer/retrain_skipped": 1.0}  # one class only: nothing to fit
        name = self.cfg.shaping.probe or self.roles.probe_names[0]
        t = self.cfg.pipeline.timeout_s
        tensors, metrics = wait(self.roles.scorers[0].refit_probe.remote(name, table, labels.tolist()), "scorer (refit)", t)
        targets = self.roles.scorers + ([self.roles.evaluator] if self.roles.evaluator else [])
        wait([a.set_probe.remote(name, tensors) for a in targets], "scorer (set probe)", t)
        self.roles.probe_overrides[name] = tensors
        return {"scorer/retrain_auroc": metrics["auroc"], "scorer/retrain_positives": float(labels.sum())}


def scale_decision(lag: float, idle_streak: int, n: int, n_min: int, n_max: int, up: float = 1.0,
                   idle: float = 0.3, idle_steps: int = 3) -> tuple[int, int]:
    """(+1 add a scorer / -1 retire one / 0, new idle streak) from lag = scoring seconds / generation seconds
    of a step: above `up` scored batches lag generation; below `idle` for `idle_steps` steps scorers idle."""
    if lag > up:
        return (1 if n < n_max else 0), 0
    streak = idle_streak + 1 if lag < idle else 0
    if streak >= idle_steps and n > n_min:
        return -1, 0
    return 0, streak


class ScorerScaler:
    """Scorer count between scorer.num_workers and scorer.max_workers, by backlog. A retired scorer first
    drains (gets no new chunks) and is stopped once no batch in flight still uses it."""

    def __init__(self, cfg: Config, roles: Roles, log=print) -> None:
        self.cfg, self.roles, self.log, self.streak = cfg, roles, log, 0

    def __call__(self, gen_stats, score_stats, pending: deque, weights: tuple[Any, int]) -> dict[str, float]:
        import ray

        from pipeline.remote import wait

        s, roles = self.cfg.scorer, self.roles
        active = roles.active_scorers or len(roles.scorers)
        if s.max_workers is None:
            return {"scorer/workers": active}
        busy = {c.scorer for f in pending for c in f.chunks}
        while len(roles.scorers) > active and len(roles.scorers) - 1 not in busy:  # drained: stop it
            ray.kill(roles.scorers.pop())
        lag = max(x.seconds for x in score_stats) / max(max(x.seconds for x in gen_stats), 1e-6)
        move, self.streak = scale_decision(lag, self.streak, active, s.num_workers, s.max_workers)
        if move > 0 and len(roles.scorers) == active:
            new = roles.new_scorer(active)
            wait(new.ready.remote(), "scorer (scale-up start-up)", self.cfg.pipeline.timeout_s)
            state_ref, version = weights
            if state_ref is not None and s.model == "live":
                wait(new.update_weights.remote(state_ref, version), "scorer (scale-up weights)", self.cfg.pipeline.timeout_s)
            for name, tensors in roles.probe_overrides.items():
                wait(new.set_probe.remote(name, tensors), "scorer (scale-up probe)", self.cfg.pipeline.timeout_s)
            roles.scorers.append(new)
            active += 1
            self.log(f"scoring lags generation ({lag:.2f}x): scorers {active - 1} -> {active}")
        elif move > 0:  # a draining scorer is still there: take it back instead of starting one
            active += 1
        elif move < 0:
            active -= 1
            self.log(f"scorers idle: {active + 1} -> {active}")
        roles.active_scorers = active
        return {"scorer/workers": active, "scorer/lag": lag}


def probe_eval(cfg: Config, roles: Roles, sink: ParquetSink, step: int, state_ref: Any, scored: pa.Table | None) -> dict:
    """Evaluation checkpoint: AUROCs of the probes on live and frozen activations (see actors/evaluator.py)."""
    from pipeline.remote import wait

    if roles.evaluator is None:
        return {}
    metrics = wait(roles.evaluator.report.remote(state_ref, scored), "evaluator", cfg.pipeline.timeout_s)
    sink.log({"step": step, **metrics})
    return metrics


def greedy_accuracy(cfg: Config, world: World, roles: Roles) -> float | None:
    """Greedy accuracy of generator 0 on the held-out eval prompts (None when there are none): the
    ground truth's "correct" rate when the task has one (a loophole verifier would flatter), else the reward."""
    from pipeline.remote import wait

    if not world.eval_prompts:
        return None
    outs = wait(
        roles.generators[0].greedy.remote(world.eval_prompt_ids, cfg.generator.max_new_tokens),
        "generator (eval)", cfg.pipeline.timeout_s,
    )
    texts = world.decode(outs)
    if world.ground_truth_fn is not None:
        return float(np.mean([t == "correct" for t in world.ground_truth_fn(texts, world.eval_prompts.answers)]))
    return float(np.mean(world.reward_fn(texts, world.eval_prompts.answers)))


def step_metrics(step, version, staleness, reward_metrics, gen_stats, score_stats, train_stats, timer) -> dict:
    gen_seconds = max(s.seconds for s in gen_stats)
    tokens = sum(s.num_tokens for s in gen_stats)
    n_tok = sum(s.num_tokens for s in train_stats)

    def tok_mean(attr: str) -> float:
        return sum(getattr(s, attr) * s.num_tokens for s in train_stats) / max(n_tok, 1)

    row = {"step": step, "version": version, "pipeline/staleness": staleness, **reward_metrics,
           "rollout/tokens": tokens, "rollout/tokens_per_s": tokens / max(gen_seconds, 1e-9),
           "learner/loss": tok_mean("loss"), "learner/policy_loss": tok_mean("policy_loss"),
           "learner/kl": tok_mean("kl"), "learner/clip_frac": tok_mean("clip_frac"),
           "learner/grad_norm": train_stats[0].grad_norm,
           "scorer/nonfinite": sum(s.num_nonfinite for s in score_stats),
           "scorer/padding_waste": float(np.mean([s.padding_waste for s in score_stats])),
           "time/generate_s": gen_seconds, "time/score_s": max(s.seconds for s in score_stats),
           "time/learn_compute_s": max(s.seconds for s in train_stats)}
    row.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
    row["time/step_s"] = sum(timer.seconds.values())
    return row


def log_step(row: dict, log, quiet: bool) -> None:
    step = row["step"]
    if quiet and step != 1 and step % 10:
        return
    log(f"step {step:4d}  task_reward {row['rollout/task_reward']:.3f}  shaped {row['rollout/shaped_reward']:.3f}  "
        f"kl {row['learner/kl']:.4f}  staleness {row['pipeline/staleness']}  {row['time/step_s']:.2f}s/step")


def summarize(rows: list[dict], eval_start: float | None, eval_end: float | None, checkpoint: str | None,
              run_dir: Path) -> dict:
    def mean(key: str, part: slice) -> float:
        vals = [r[key] for r in rows[part] if r.get(key) is not None]
        return float(np.mean(vals)) if vals else math.nan

    k = max(1, len(rows) // 5)
    return {
        "run_dir": str(run_dir),
        "steps": len(rows),
        "task_reward_first_steps": mean("rollout/task_reward", slice(0, k)),
        "task_reward_last_steps": mean("rollout/task_reward", slice(-k, None)),
        "eval_greedy_accuracy_start": eval_start,
        "eval_greedy_accuracy_end": eval_end,
        "mean_step_s": mean("time/step_s", slice(None)),
        "final_checkpoint": checkpoint,
    }
