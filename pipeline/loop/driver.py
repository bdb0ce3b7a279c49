"""The driver: one loop that wires generators, scorers, the rewarder and the learner.

Read `train_loop` top to bottom: launch generation (and its scoring) up to `max_staleness` steps
ahead, take the oldest batch, checkpoint when one is due, compute shaped rewards, take one learner
step, push the new weights to every generator, log a metrics row. Generation for later steps runs on
the generator actors while the learner trains, so the two overlap; the version every rollout came
from is tracked and the staleness of each batch is checked. The actors themselves, and everything that
keeps them alive (start, replace, scale, push weights, restart the learner), belong to
`pipeline/loop/fleet.py`; evaluation points and the probe refit to `pipeline/loop/evaluation.py`; the metrics row and
the summary to `pipeline/loop/metrics.py`; run folders, resuming and the STOP file to
`pipeline/loop/run_dir.py`; joining Ray (`init_ray`) to `pipeline/loop/remote.py`.

Checkpoint v is taken in step v+1, after that step's rollouts are in and before the learner trains on
them, together with every rollout already launched (`checkpoints/step_v.inflight.parquet`): those came
from versions up to v, and an uninterrupted run trains on exactly them. When the learner dies (its
process, or its node), or a run is resumed, the loop restarts from the newest checkpoint with those
rollouts, so the steps after it are the steps an uninterrupted run takes.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config, dump_toml
from pipeline.loop.evaluation import ProbeRetrainer, greedy_accuracy, probe_eval
from pipeline.loop.loggers import Loggers
from pipeline.loop.metrics import ParquetSink, StageTimer, log_step, step_metrics, summarize, sync_metrics
from pipeline.loop.rewarder import Rewarder
from pipeline.loop.run_dir import make_run_dir, previous_samples, stop_requested, write_samples
from pipeline.worlds.world import World, build_world

if TYPE_CHECKING:
    from actors.generator import GenerateStats
    from actors.scorer import ScoreStats
    from pipeline.loop.fleet import Fleet


@dataclass
class Chunk:
    """One slice of a step's prompts: which generator and scorer got it, and the refs of their results."""

    prompts: pa.Table
    seed: int
    generator: int
    scorer: int
    min_version: int = 0  # the weights version its generator waits for before sampling: the driver's published
    # version at launch; continuous: the oldest the staleness bound allows its step (step - 1 - max_staleness)
    key: str = ""  # continuous: the chunk's name on its generator (unique per launch)
    table: Any = None  # generator's rollout table ref
    gen_stats: Any = None
    scored: Any = None  # scorer's scored table ref
    score_stats: Any = None


@dataclass
class InFlight:
    """One step's rollouts on their way through generation and scoring (or already in, from a checkpoint)."""

    step: int
    chunks: list[Chunk]
    ready: tuple | None = None  # (scored table, generator stats, scorer stats) when nothing is in flight


def prepare(cfg: Config, log: Callable[[str], None] = print) -> tuple[Path, World]:
    """Check every input and build what is missing; user mistakes raise ValueError before Ray starts."""
    world = build_world(cfg, log)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    log(f"run directory: {run_dir}")
    return run_dir, world


def run(cfg: Config, run_dir: Path, world: World, log: Callable[[str], None] = print, resume_from: Path | None = None) -> dict:
    """Start the roles on Ray, train, write summary.json and return the summary (a run stopped by a STOP
    file writes none: its summary says `stopped_at_step`).

    With `resume_from` (a checkpoint of this run), the learner restores weights and optimizer state, the
    generators receive those weights before they generate, and training continues at the next step.
    """
    import ray

    from pipeline.loop.fleet import Fleet
    from pipeline.loop.remote import init_ray

    owns_ray = not ray.is_initialized()  # a caller (a test, a notebook) may hold a Ray instance already
    if owns_ray:
        init_ray(cfg)
    fleet = None
    try:
        fleet = Fleet.start(cfg, world, log)
        summary = train_loop(cfg, world, fleet, run_dir, log, resume_from=resume_from)
    finally:
        if owns_ray:
            ray.shutdown()
        elif fleet is not None:  # leave a caller's Ray instance as we found it
            fleet.shutdown()
    if world.text_monitor is not None:  # what the text alone catches, beside the probe, on the same held-out rows
        summary["text_monitor_held_out_auroc"] = world.text_monitor.notes.get("held_out", {}).get("auroc")
        summary["probe_held_out_auroc"] = world.text_monitor.notes.get("probe_held_out_auroc")
    if "stopped_at_step" not in summary:  # summary.json marks a finished run (experiment and profile skip it)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def launch_step(cfg: Config, world: World, fleet: Fleet, step: int) -> InFlight:
    """Submit generation and scoring of one step's prompts; nothing here blocks.

    Prompts are cut into max(#generators, #scorers) chunks so that every worker of both kinds gets work;
    each scorer call takes its generator's table ref directly, without a round trip through the driver.
    Each prompt samples with its own seed, so how a step is cut does not change its rollouts.
    """
    prompts = world.prompts_for_step(step, cfg.pipeline.prompts_per_step, cfg.pipeline.seed)
    # continuous: a step's groups wait for the oldest version the staleness bound allows them, not the newest
    version = max(0, step - 1 - cfg.pipeline.max_staleness) if continuous(cfg) else fleet.version
    num_scorers = fleet.active_scorers or len(fleet.scorers)
    num_chunks = max(len(fleet.generators), num_scorers)
    bounds = np.linspace(0, prompts.num_rows, num_chunks + 1).astype(int)
    chunks = []
    for c in range(num_chunks):
        if bounds[c + 1] > bounds[c]:
            part = prompts.slice(bounds[c], bounds[c + 1] - bounds[c])
            chunk = Chunk(part, cfg.pipeline.seed, c % len(fleet.generators), c % num_scorers, version)
            chunks.append(submit_chunk(cfg, fleet, chunk))
    return InFlight(step, chunks)


def continuous(cfg: Config) -> bool:
    """generator.update_mode = "continuous": generators keep their engines full (actors/stream.py)."""
    return cfg.generator.update_mode == "continuous"


_launches = iter(range(1 << 62))  # continuous: every chunk sent to a generator gets a name of its own


def submit_chunk(cfg: Config, fleet: Fleet, chunk: Chunk, generate: bool = True) -> Chunk:
    """Send a chunk to its generator (unless `generate` is False: its table is in) and its table to its scorer."""
    from pipeline.loop.remote import STREAM

    if generate:
        gen = fleet.generators[chunk.generator]
        if continuous(cfg):  # queued at once; the take call returns when its groups are done
            chunk.key = f"{chunk.min_version}.{chunk.prompts.column('group_id')[0]}.{next(_launches)}"
            gen.admit.options(concurrency_group=STREAM).remote(chunk.key, chunk.prompts, cfg.pipeline.group_size,
                                                                chunk.seed, chunk.min_version)
            # takes wait side by side: a chunk sent again after its generator died may finish before later ones
            chunk.table, chunk.gen_stats = gen.take.options(num_returns=2, concurrency_group=STREAM).remote(
                chunk.key, cfg.pipeline.timeout_s)
        else:
            chunk.table, chunk.gen_stats = gen.generate.options(num_returns=2).remote(
                chunk.prompts, cfg.pipeline.group_size, chunk.seed, chunk.min_version)
    chunk.scored, chunk.score_stats = fleet.scorers[chunk.scorer].score.options(num_returns=2).remote(chunk.table)
    return chunk


def collect(cfg: Config, fleet: Fleet, flight: InFlight, log: Callable[[str], None] = print) -> tuple[pa.Table, list[GenerateStats], list[ScoreStats], int]:
    """Wait for a step's scored tables. A chunk whose worker died, or whose results died with a node, is redone
    (its dead workers replaced first), so no rollout is lost or counted twice. A chunk still unfinished after
    pipeline.timeout_s counts as hung: its worker is replaced and the chunk redone.

    Returns (scored table, generator stats, scorer stats, workers replaced) and keeps the result on the flight.
    """
    import ray

    from pipeline.loop.remote import Frozen, RoleTimeout, wait, wait_watched

    if flight.ready is not None:
        return (*flight.ready, 0)
    t = cfg.pipeline.timeout_s
    restarts = 0
    for attempt in range(cfg.pipeline.max_restarts + 1):
        try:
            chunks = flight.chunks
            names = [f"chunk {i} of step {flight.step} (generator {c.generator}, scorer {c.scorer})"
                     for i, c in enumerate(chunks)]
            scored = wait_watched([c.scored for c in chunks], names, "generation and scoring", t,
                                  [[fleet.generators[c.generator], fleet.scorers[c.scorer]] for c in chunks],
                                  cfg.pipeline.health_timeout_s)
            flight.ready = (pa.concat_tables(scored), wait([c.gen_stats for c in flight.chunks], "generator", t),
                            wait([c.score_stats for c in flight.chunks], "scorer", t))
            return (*flight.ready, restarts)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, RoleTimeout) as e:
            if attempt == cfg.pipeline.max_restarts:
                raise RuntimeError(f"step {flight.step}: its rollouts were lost {attempt + 1} times "
                                   f"(pipeline.max_restarts={cfg.pipeline.max_restarts}): {e}") from None
            log(f"step {flight.step}: {type(e).__name__}; redoing the chunks it took")
            # A call past pipeline.timeout_s is hung; a frozen process is found by replace_dead's own pings.
            hung = _hung(flight) if isinstance(e, RoleTimeout) and not isinstance(e, Frozen) else None
            restarts += fleet.replace_dead(hung=hung)
            for chunk in flight.chunks:
                if not _ok(chunk.scored, t):
                    submit_chunk(cfg, fleet, chunk, generate=not _ok(chunk.table, t))
    raise AssertionError("unreachable")


def _hung(flight: InFlight) -> dict[str, set[int]]:
    """The workers of a flight's chunks that are still unfinished: the generator when its table is not in, else
    the scorer."""
    import ray

    out: dict[str, set[int]] = {"generator": set(), "scorer": set()}
    for c in flight.chunks:
        if ray.wait([c.scored], timeout=0)[0]:
            continue
        if ray.wait([c.table], timeout=0)[0]:
            out["scorer"].add(c.scorer)
        else:
            out["generator"].add(c.generator)
    return out


def _ok(ref: Any, timeout_s: float) -> bool:
    """The ref holds a value (waits for it if it is still being computed); False if it died with its worker."""
    import ray

    from pipeline.loop.remote import wait

    try:
        wait(ref, "generator/scorer (redo check)", timeout_s)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
        return False


def train_loop(cfg: Config, world: World, fleet: Fleet, run_dir: Path, log: Callable[[str], None] = print, resume_from: Path | None = None) -> dict:
    loop = LoopState(cfg, run_dir)
    try:
        return _train(cfg, world, fleet, run_dir, log, resume_from, loop)
    finally:
        loop.loggers.close()  # TensorBoard and W&B sinks flush what they hold, also when the run fails


def _train(cfg: Config, world: World, fleet, run_dir: Path, log, resume_from: Path | None, loop: LoopState) -> dict:
    from pipeline.loop.fleet import LearnerLost, ScorerScaler
    from pipeline.loop.turns import Turns
    from pipeline.progress import progress_bar

    p = cfg.pipeline
    rewarder, scaler = Rewarder(cfg, world, loop.sink.rows), ScorerScaler(fleet, log)
    retrainer = loop.retrainer = ProbeRetrainer(cfg, fleet)
    turns = Turns.of(cfg)  # pipeline.colocate: generators and learner hand the devices over around each step
    eval_start = greedy_accuracy(cfg, world, fleet)
    log(f"greedy eval accuracy before training: {eval_start:.1%}" if eval_start is not None else "")
    if resume_from is not None:
        loop.restart(fleet, resume_from, log)
    else:
        probe_eval(cfg, fleet, loop.eval_sink, 0, None, None)
    bar = progress_bar(p.num_steps, "training", "step", cfg.run.progress)
    bar.update(loop.version)
    step = loop.version + 1
    stopped = False
    while step <= p.num_steps:
        if stop_requested(run_dir, loop.version, log):
            stopped = True
            break
        timer, wall_start = StageTimer(), time.time()
        try:
            # Keep generation (and scoring) up to max_staleness steps ahead of the learner.
            turns.ready_to_generate(fleet)  # colocated: engines awake, the learner's state out of their way
            # continuous: one step more, so the groups that wait for the next version are queued when it lands
            while loop.next_launch <= min(p.num_steps, step + p.max_staleness + continuous(cfg)):
                loop.pending.append(launch_step(cfg, world, fleet, loop.next_launch))
                loop.next_launch += 1
            flight = loop.pending.popleft()
            with timer("wait_rollouts"):
                fleet.settle_loads()
                scored, gen_stats, score_stats, restarts = collect(cfg, fleet, flight, log)
            staleness = check_staleness(step, loop.version, scored, p.max_staleness)
            loop.last_scored = scored
            if loop.checkpoint_due(loop.version):
                with timer("checkpoint"):
                    loop.checkpoint(fleet, [flight, *loop.pending], scored, log)
            with timer("reward"):
                batch, reward_metrics, truth = rewarder(scored)
            with timer("scale"):
                reward_metrics.update(scaler(gen_stats, score_stats, loop.pending))
            turns.before_learn(fleet)  # its seconds: colocate/*_s
            with timer("learn"):
                train_stats = fleet.train(batch)
            loop.version = train_stats[0].version
            with timer("sync"):
                turns.after_learn(fleet, lambda: fleet.push_weights(loop.version))
            with timer("probe_retrain"):
                reward_metrics.update(retrainer(step, batch, truth))
        except LearnerLost as e:
            from learner.checkpoint import latest_checkpoint as newest

            log(f"step {step}: {e}")
            # no checkpoint yet: from the initial weights; colocated engines wake before they receive them
            turns.around_restart(fleet, lambda: loop.restart(fleet, newest(run_dir), log))
            bar.reset(p.num_steps)
            bar.update(loop.version)
            step = loop.version + 1
            continue
        row = step_metrics(step, loop.version, staleness, reward_metrics, gen_stats, score_stats, train_stats, timer)
        row.update({"time/wall_start": wall_start, "time/wall_end": time.time(),  # for Ray timelines
                    "time/step_wall_s": time.time() - wall_start, "pipeline/restarts": restarts,
                    "pipeline/learner_restarts": loop.learner_restarts, "rollout/rows": scored.num_rows,
                    **token_staleness(scored, step - 1),
                    **sync_metrics(fleet), **turns.metrics()})
        loop.log_step(row, rewarder.sample(batch, cfg.run.rollout_sample_per_step, step))
        bar.update(1)
        bar.set_postfix(reward=f"{row['rollout/task_reward']:.3f}", kl=f"{row['learner/kl']:.4f}")
        log_step(row, log, quiet=not bar.disable)
        step += 1
    bar.close()
    fleet.settle_loads()
    # A stopped run keeps the rollouts already launched beside its last checkpoint, so --resume takes the steps
    # an uninterrupted run takes; a finished run has none left.
    final = loop.checkpoint(fleet, list(loop.pending) if stopped else [], loop.last_scored, log)
    if stopped:
        return {**summarize(loop.sink.rows, eval_start, None, final, run_dir), "stopped_at_step": loop.version}
    eval_end = greedy_accuracy(cfg, world, fleet)
    return summarize(loop.sink.rows, eval_start, eval_end, final, run_dir)


class LoopState:
    """What carries from one step of `train_loop` to the next, and how it is saved and restored: the version
    the learner holds, the rollouts in flight, the metrics and sample sinks, the checkpoint schedule."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.version, self.next_launch = 0, 1
        self.pending: deque[InFlight] = deque()
        self.loggers = Loggers(run_dir, cfg.run)  # run.loggers: TensorBoard, W&B beside the Parquet record
        self.sink = ParquetSink(run_dir / "metrics.parquet", self.loggers)
        self.eval_sink = ParquetSink(run_dir / "eval.parquet", self.loggers)
        self.samples: list[pa.Table] = []
        self.last_checkpoint_time, self.last_checkpoint_version = time.monotonic(), 0
        self.learner_restarts = 0  # in this run, all told (a metric)
        self.restarts_in_a_row = 0  # since the last checkpoint (bounded by pipeline.max_restarts)
        self.last_scored: pa.Table | None = None  # the latest scored batch (the evaluator's live-vs-frozen gap)
        self.retrainer: ProbeRetrainer | None = None  # scorer.retrain_every: its probes and window are checkpointed

    def log_step(self, row: dict, sample: pa.Table) -> None:
        self.sink.log(row)
        self.samples.append(sample)
        write_samples(self.samples, self.run_dir)  # every step: a crash keeps what was sampled (a few rows a step)

    def checkpoint_due(self, version: int) -> bool:
        """Checkpoint `version` now? Every learner.checkpoint_every versions, after learner.checkpoint_minutes,
        and at every evaluation point (its weights are what the evaluator reads)."""
        lc, every = self.cfg.learner, self.cfg.eval.every
        if version == self.last_checkpoint_version:  # 0, or the checkpoint just restored
            return False
        minutes = (time.monotonic() - self.last_checkpoint_time) / 60
        return bool((lc.checkpoint_every and version % lc.checkpoint_every == 0)
                    or (lc.checkpoint_minutes and minutes >= lc.checkpoint_minutes)
                    or (every and version % every == 0))

    def checkpoint(self, fleet: Fleet, flights: list[InFlight], scored: pa.Table | None, log: Callable[[str], None] = print) -> str:
        """Checkpoint the learner's version with every flight launched so far (their rollouts written first, the
        learner's state file last), evaluate it when an evaluation is due, prune old checkpoints."""
        from pipeline.loop.checkpoints import prune, write_inflight, write_refit

        cfg = self.cfg
        # continuous: the last step launched waits for the version this step trains; it is launched again on restart
        flights = [f for f in flights if all(c.min_version <= self.version for c in f.chunks)]
        for flight in flights:
            collect(cfg, fleet, flight, log)
        write_inflight(self.run_dir, self.version, [(f.step, *f.ready) for f in flights])
        if cfg.scorer.retrain_every:
            write_refit(self.run_dir, self.version, fleet.probe_overrides,
                        list(self.retrainer.window) if self.retrainer is not None else [])
        path = fleet.checkpoint(self.run_dir)
        self.last_checkpoint_time, self.last_checkpoint_version = time.monotonic(), self.version
        self.restarts_in_a_row = 0
        if cfg.eval.every and (self.version % cfg.eval.every == 0 or self.version == cfg.pipeline.num_steps):
            probe_eval(cfg, fleet, self.eval_sink, self.version, path, scored)
        prune(self.run_dir, cfg.learner.keep_checkpoints)
        return path

    def restart(self, fleet: Fleet, checkpoint: Path | None, log: Callable[[str], None] = print) -> None:
        """Carry on from `checkpoint` (None: from the start): every learner rank restarts from it, receivers get
        its weights, the rollouts launched before it return to the queue, the probes refit by then (and the
        rollouts the next refit uses) come back, and metric and sample rows after it are dropped (they are
        recomputed)."""
        from pipeline.loop.checkpoints import read_inflight, read_refit

        self.learner_restarts += 1
        self.restarts_in_a_row += 1
        if self.restarts_in_a_row > self.cfg.pipeline.max_restarts:
            raise RuntimeError(f"the learner failed {self.restarts_in_a_row} times in a row since checkpoint "
                               f"{checkpoint} (pipeline.max_restarts={self.cfg.pipeline.max_restarts}); giving up")
        self.version = fleet.restart_learners(checkpoint)
        self.last_checkpoint_version = self.version
        if self.cfg.scorer.retrain_every:
            probes, window = read_refit(checkpoint)
            fleet.set_probes(probes)
            if self.retrainer is not None:
                self.retrainer.window.clear()
                self.retrainer.window.extend(window)
        saved = read_inflight(checkpoint) if checkpoint is not None else []
        flights = [InFlight(step, [], (table, gen, score)) for step, table, gen, score in saved]
        self.pending = deque(flights)
        self.next_launch = max([f.step for f in flights], default=self.version) + 1
        self.sink.truncate(self.version)
        self.eval_sink.truncate(self.version)
        self.samples = previous_samples(self.run_dir, self.version)
        log(f"learner restarted from {checkpoint or 'the initial weights'} at version {self.version}, with "
            f"{len(flights)} step(s) of rollouts launched before it")


def token_staleness(scored: pa.Table, version: int) -> dict[str, float]:
    """How many versions each sampled token lags `version` (the learner's, before the step that trains on them):
    mean and max over the batch's tokens."""
    lag = version - np.concatenate([np.asarray(v, dtype=np.int64) for v in scored.column("behavior_versions").to_pylist()]
                                   or [np.zeros(0, np.int64)])
    return {"rollout/token_staleness_mean": float(lag.mean()) if lag.size else 0.0,
            "rollout/token_staleness_max": float(lag.max()) if lag.size else 0.0}


def check_staleness(step: int, version: int, scored: pa.Table, max_staleness: int) -> int:
    """How many versions the oldest rollout of this batch lags the learner; more than allowed is a bug."""
    staleness = version - min(scored.column("policy_version").to_pylist())
    if not 0 <= staleness <= max_staleness:
        raise RuntimeError(f"step {step}: a rollout is {staleness} weight versions behind the learner (version "
                           f"{version}), beyond pipeline.max_staleness={max_staleness}: a generator missed an update")
    return staleness


