"""The fleet: every running role, and everything that keeps it alive.

`pipeline/loop/driver.py` runs the training loop; this module owns the actors it talks to. It starts the roles
(each in its placement group), brings up a worker (start, wait until ready, give it any refit probes and
the current weights) for a replacement, a scale-up and a learner restart alike, replaces dead workers,
restarts every learner rank from a checkpoint when one is lost, scales scorers by backlog, and pushes
each new weight version to every receiver (generators, and scorers in live mode).

With the collective transport the receivers and learner rank 0 form one transfer group. A group cannot
admit a member, so when the receivers change (a replacement, a scale-up) the fleet builds a new group
and sends the current version to all of it; a sync that fails because a receiver died or went silent is
repaired the same way. Every wait has a timeout and names the role (pipeline/loop/remote.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config, weight_backend
from pipeline.cores import CORES_ENV
from pipeline.worlds.world import World

if TYPE_CHECKING:
    from actors.generator import GenerateStats
    from actors.scorer import ScoreStats
    from pipeline.config import ScorerConfig

QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class SyncFailed(RuntimeError):
    """A weight version could not reach every receiver, even after replacing the ones that were down."""


class LearnerLost(RuntimeError):
    """A learner rank died (its process, or its node) or stopped answering. The loop restarts every rank from
    the newest checkpoint (`Fleet.restart_learners`)."""


@dataclass
class Fleet:
    cfg: Config
    world: World
    log: Any = print
    generators: list[Any] = field(default_factory=list)
    scorers: list[Any] = field(default_factory=list)
    learners: list[Any] = field(default_factory=list)
    evaluator: Any = None
    groups: dict[str, Any] = field(default_factory=dict)  # role -> Placement
    active_scorers: int = 0  # scorers that get new work; those past it are draining (0: all)
    probe_overrides: dict[str, dict] = field(default_factory=dict)  # probes refit during the run
    version: int = 0  # the weight version every receiver holds
    weights_ref: Any = None  # object store: the last published weights (None: the initial ones)
    pending_loads: list[Any] = field(default_factory=list)  # object store: loads queued on receivers
    transfer_members: tuple = ()  # collective: the receivers of the current transfer group
    incarnation: int = 0  # collective: how many transfer groups this run has built
    last_sync: Any = None  # SendStats of rank 0's last send
    processes: dict[str, tuple] = field(default_factory=dict)  # generator actor id -> (node id, its pids)

    @property
    def backend(self) -> str:
        return weight_backend(self.cfg)

    @property
    def timeout(self) -> float:
        return self.cfg.pipeline.timeout_s

    @property
    def send_timeout(self) -> float:
        """The driver's bound on a learner's weight-transfer call: above the learner's own bounds on its receivers
        (their health ping, the call in flight, the transfer timeouts), so a receiver's fault reaches the driver
        as the learner's report naming the receiver, not as a silent learner."""
        p, w = self.cfg.pipeline, self.cfg.weights
        return p.timeout_s + p.health_timeout_s + 2 * w.timeout_s

    # --- start -----------------------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: Config, world: World, log: Callable[[str], None] = print) -> Fleet:
        """Reserve every role's placement group (failing fast, naming the role), start all roles, wait."""
        from pipeline.loop.remote import wait

        fleet = cls(cfg, world, log)
        g, s, lc = cfg.generator, cfg.scorer, cfg.learner
        log(f"starting {g.num_workers} generator(s), {s.num_workers} scorer(s), {lc.num_ranks} learner rank(s); "
            f"weights: {cfg.weights.transport} ({fleet.backend})")
        fleet.reserve()
        fleet.generators = [fleet.new_generator(i) for i in range(g.num_workers)]
        fleet.scorers = [fleet.new_scorer(i) for i in range(s.num_workers)]
        if fleet.shares_gpus:  # vLLM measures the GPU's free memory as it starts: the learner loads after it
            fleet.await_started("generator", fleet.generators, fleet.new_generator)
        fleet.start_learners()
        if cfg.eval.every:
            from actors.evaluator import ProbeEvaluator

            fleet.evaluator = fleet._make(ProbeEvaluator, "evaluator", cfg.eval, 0, dict(
                model_path=world.model_path, probe_paths=world.evaluated_probes(), labelled=world.eval_labelled,
                dtype=cfg.model.dtype, pad_id=world.pad_id, seed=cfg.pipeline.seed, threshold=cfg.shaping.threshold,
                own=own_samples(cfg, world), gpus=cfg.eval.num_gpus,
                prompt_ids=world.encode(world.eval_labelled.prompts) if world.encode else None))
            wait(fleet.evaluator.ready.remote(), "evaluator (start-up)", fleet.timeout)
        fleet.await_started("scorer", fleet.scorers, fleet.new_scorer)
        fleet.await_started("generator", fleet.generators, fleet.new_generator)
        return fleet

    def await_started(self, kind: str, actors: list[Any], make: Callable[[int], Any]) -> None:
        """Wait until every worker of `kind` is up. One that dies during start-up (its process killed, its node
        lost) or does not come up within pipeline.timeout_s is replaced, like a worker lost mid-run, up to
        pipeline.max_restarts times."""
        import ray

        from pipeline.loop.remote import RoleTimeout, wait

        for attempt in range(self.cfg.pipeline.max_restarts + 1):
            refs = [a.ready.remote() for a in actors]
            failed = []
            for i, ref in enumerate(refs):
                try:
                    wait(ref, f"{kind} {i} (start-up)", self.timeout)
                except (ray.exceptions.RayActorError, RoleTimeout) as e:
                    failed.append((i, str(e).splitlines()[0]))
            if not failed:
                if kind == "generator":
                    for actor in actors:
                        self.remember_processes(actor)
                return
            if attempt == self.cfg.pipeline.max_restarts:
                raise RuntimeError(f"{kind} {failed[0][0]} failed to start {attempt + 1} times "
                                   f"(pipeline.max_restarts={self.cfg.pipeline.max_restarts}): {failed[0][1]}")
            for i, why in failed:
                self.log(f"{kind} {i} died during start-up ({why}); starting a replacement")
                self.stop(actors[i])
                actors[i] = make(i)

    def reserve(self) -> None:
        from pipeline.loop.remote import Resources, check_fits, release, reserve

        roles = self.cfg.roles()
        check_fits([(role, n, Resources.of(rc)) for role, n, rc in roles])  # fail fast, naming the role
        try:
            for role, n, rc in roles:
                if self.shares_gpus and role == "learner":
                    continue
                res = Resources.of(rc)
                if self.shares_gpus and role == "generator":  # bundle i: generator i and learner rank i, one GPU
                    role, res = "colocated", res + Resources.of(self.cfg.learner)
                self.groups[role] = reserve(role, n, res, self.timeout, rc.placement)
        except ValueError:
            release(self.groups.values())
            raise
        if self.shares_gpus:
            self.groups["generator"] = self.groups["learner"] = self.groups.pop("colocated")

    @property
    def lands_mid_generation(self) -> bool:
        """Weights and probes reach generators between two decoding steps (update_mode in_flight, continuous)."""
        return self.cfg.generator.update_mode != "between_steps"

    @property
    def shares_gpus(self) -> bool:
        """pipeline.colocate on GPUs: generator i and learner rank i take turns on one GPU."""
        return self.cfg.pipeline.colocate and self.cfg.generator.num_gpus > 0

    def _make(self, cls: type, role: str, rc, index: int | None, kwargs: dict):
        from pipeline.loop.remote import make_actor

        # Continuous generation: a scorer scores chunks as their generators finish them, so a chunk sent again
        # (its generator died) is not stuck behind later steps' chunks, which wait for the version it trains.
        out_of_order = role == "scorer" and self.cfg.generator.update_mode == "continuous"
        group = self.groups.get(role)
        placement = (group, index) if group is not None and index is not None and index < group.count else None
        env = {**QUIET_ENV, CORES_ENV: self.cfg.pipeline.cores}  # pipeline/cores.py: threads that follow the phase
        return make_actor(cls, role, rc.num_cpus, rc.num_gpus, memory_gib=rc.memory_gib, resources=rc.resources,
                          env=env, placement=placement, out_of_order=out_of_order, **kwargs)

    def new_generator(self, i: int) -> Any:
        from actors.generator import Generator

        cfg = self.cfg
        return self._make(Generator, "generator", cfg.generator, i, dict(
            model_path=self.world.model_path, cfg=cfg.generator, weight_backend=self.backend, dtype=cfg.generator.dtype or cfg.model.dtype,
            seed=cfg.pipeline.seed + i, ablation=self.ablation(), sleep_level=cfg.sleep_level(),
            stream_capacity=cfg.stream_capacity(),
            probes=[(g.name, g.stem, g.aggregation) for g in self.world.generator_probes]))

    def shaping_probe(self) -> tuple[str, str | None] | None:
        """(stem, aggregation) of the probe that shapes training, if any."""
        w = self.world
        if not w.column_names:
            return None
        return w.probe_stem(self.cfg.shaping.probe or w.column_names[0])

    def ablation(self) -> tuple[int, list[float]] | None:
        """shaping.kind = "ablate": (layer, unit direction) of the shaping probe, for generators to project out."""
        if self.cfg.shaping.kind != "ablate":
            return None
        from probes.probe import load_probe, unit_direction

        probe = load_probe(self.shaping_probe()[0])
        return probe.layer, unit_direction(probe.weight).tolist()

    def new_scorer(self, i: int) -> Any:
        """Scorer i; those beyond scorer.num_workers (a scale-up) are placed outside the role's group."""
        from actors.scorer import Scorer

        cfg = self.cfg
        return self._make(Scorer, "scorer", cfg.scorer, i, dict(
            model_path=self.world.model_path, probe_paths=self.world.probe_paths, cfg=cfg.scorer,
            compute_ref=cfg.learner.kl_coef > 0, dtype=cfg.model.dtype, pad_id=self.world.pad_id,
            weight_backend=self.backend, carried=[g.name for g in self.world.generator_probes]))

    def start_learners(self) -> None:
        """Start every rank, then let them meet at rank 0's node (so ranks may sit on different nodes)."""
        from learner.learner import Learner

        cfg, lc = self.cfg, self.cfg.learner
        rows = cfg.pipeline.prompts_per_step * cfg.pipeline.group_size
        self.learners = [self._make(Learner, "learner", lc, r, dict(
            model_path=self.world.model_path, cfg=lc, rows_per_step=rows, rank=r, world_size=lc.num_ranks,
            dtype=cfg.model.dtype, pad_id=self.world.pad_id, shaping=cfg.shaping, probe=self.shaping_probe()))
            for r in range(lc.num_ranks)]
        setup_learners(self.learners, self.timeout)
        self.transfer_members = ()  # new ranks hold no transfer group yet

    # --- weights -----------------------------------------------------------------------------------------

    def receivers(self) -> list[Any]:
        from pipeline.loop.remote import WEIGHTS, Receiver

        # generators taking weights mid-generation get them in a concurrency group of their own
        group = WEIGHTS if self.lands_mid_generation else None
        out = [Receiver(f"generator {i}", a, self.cfg.generator.tensor_parallel_size, group)
               for i, a in enumerate(self.generators)]
        if self.cfg.scorer.model == "live":
            out += [Receiver(f"scorer {i}", a) for i, a in enumerate(self.scorers)]
        return out

    def push_weights(self, version: int) -> None:
        """Send the learner's weights (version `version`) to every receiver.

        Collective: returns once every receiver holds them (the driver launches no generation meanwhile, so
        no rollout can come from a stale engine). Object store: queues the loads and returns; actor calls run
        in order, so later generate/score calls see the new version."""
        if self.cfg.weights.transport == "object_store":
            self._publish(version)
            return
        self._send(version)

    def _publish(self, version: int) -> None:
        import ray


        wire = self._learner_call([lr.get_weights.remote() for lr in self.learners], f"weights version {version}")[0]
        assert wire.version == version, (wire.version, version)
        self.weights_ref = ray.put(wire)
        self.pending_loads = [r.call("load_weights").remote(self.weights_ref, version) for r in self.receivers()]
        self.version = version

    def settle_loads(self) -> None:
        """Object store: wait for the queued loads (a dead receiver's replacement gets the weights anyway)."""
        from pipeline.loop.remote import PeerDied, wait_each

        refs, self.pending_loads = self.pending_loads, []
        for ref in refs:
            try:
                wait_each([ref], ["a receiver"], f"loading weights version {self.version}", self.timeout)
            except PeerDied:
                pass

    def _send(self, version: int) -> None:
        from pipeline.loop.remote import PeerDied, PeerFailed, RoleTimeout, wait_each

        for attempt in range(self.cfg.pipeline.max_restarts + 1):
            try:
                self._ensure_transfer_group(version)
                names = [f"learner rank {r}" for r in range(len(self.learners))]
                stats = wait_each([lr.send_weights.remote() for lr in self.learners], names,
                                  f"send_weights (weights version {version})", self.send_timeout)
                self.last_sync, self.version = stats[0], version
                return
            except (PeerFailed, PeerDied, RoleTimeout) as e:
                if self._learner_down():
                    raise LearnerLost(f"a learner rank is down while sending weights version {version}: {e}") from None
                self.log(f"weights version {version}: {e}")
                replaced = self.replace_dead(catch_up=False)
                if not replaced or attempt == self.cfg.pipeline.max_restarts:
                    raise SyncFailed(f"weights version {version} did not reach every receiver: {e}") from None
                self.log(f"weights version {version}: replaced {replaced} receiver(s), resending")
                self.transfer_members = ()  # rebuild the group with the replacements

    def _ensure_transfer_group(self, version: int) -> None:
        """Build a new transfer group when the receivers changed since the last one."""
        from pipeline.loop.remote import ReceiverClient, wait_each

        receivers = self.receivers()
        members = tuple(r.actor for r in receivers)
        if members == self.transfer_members:
            return
        self.incarnation += 1
        client = ReceiverClient(receivers, self.timeout, self.cfg.pipeline.health_timeout_s)
        client.version = version
        w = self.cfg.weights
        names = [f"learner rank {r}" for r in range(len(self.learners))]
        wait_each([lr.init_weight_transfer.remote(client, self.backend, int(w.bucket_mb * 2**20), w.timeout_s,
                                                  f"probe-rl-weights-{self.incarnation}") for lr in self.learners],
                  names, f"init_weight_transfer (group {self.incarnation}, weights version {version})",
                  self.send_timeout)
        self.transfer_members = members

    def catch_up(self, force: bool = False) -> None:
        """Give every receiver the learner's current weights before any of them gets more work (new receivers
        since the last sync; with `force`, all of them, as after a learner restart)."""
        from pipeline.loop.remote import wait

        if self.version == 0 and not force:
            return  # they loaded the initial weights themselves
        if self.cfg.weights.transport == "object_store":
            if self.weights_ref is None or force:
                self._publish(self.version)
            wait([r.call("load_weights").remote(self.weights_ref, self.version) for r in self.receivers()],
                 f"receivers (catching up to weights version {self.version})", self.timeout)
            self.pending_loads = []
        else:
            self._send(self.version)

    def restart_learners(self, checkpoint: Path | None) -> int:
        """Stop every learner rank, start them again in their bundles (Ray re-places the bundles of a lost
        node), load `checkpoint` (None: the initial weights) and give every receiver its weights."""
        from pipeline.loop.remote import wait

        self.reset_streams()
        for actor in self.learners:
            self.stop(actor)
        self.start_learners()
        self.version = 0
        if checkpoint is not None:
            self.version = wait([lr.load_checkpoint.remote(str(checkpoint)) for lr in self.learners],
                                f"learner (loading {checkpoint})", self.timeout)[0]
        self.weights_ref, self.pending_loads = None, []
        self.catch_up(force=True)
        return self.version

    def reset_streams(self) -> None:
        """Continuous generators drop the chunks they hold (the driver relaunches them from a checkpoint); a dead
        generator holds none, and is replaced when its rollouts are next needed."""
        import ray

        from pipeline.loop.remote import STREAM, wait

        if self.cfg.generator.update_mode != "continuous":
            return
        for i, gen in enumerate(self.generators):
            try:
                wait(gen.reset_stream.options(concurrency_group=STREAM).remote(), f"generator {i} (reset)",
                     self.cfg.pipeline.health_timeout_s)
            except (ray.exceptions.RayActorError, RuntimeError) as e:
                self.log(f"generator {i}: {str(e).splitlines()[0]}; it is replaced when next needed")

    def call_each(self, role: str, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every generator or learner rank (pipeline/loop/turns.py's hand-overs); their results.
        A dead or silent learner rank is LearnerLost; a dead or frozen generator is replaced and the call made
        again on every generator (the hand-overs are idempotent), up to pipeline.max_restarts times."""
        from pipeline.loop.remote import PeerDied, PeerFailed, RoleTimeout, wait_each

        if role == "learners":
            return self._learner_call([getattr(lr, method).remote(*args) for lr in self.learners], method)
        for attempt in range(self.cfg.pipeline.max_restarts + 1):
            names = [f"generator {i}" for i in range(len(self.generators))]
            try:
                return wait_each([getattr(g, method).remote(*args) for g in self.generators], names, method,
                                 self.timeout, self.generators, self.cfg.pipeline.health_timeout_s)
            except (PeerDied, PeerFailed, RoleTimeout) as e:
                if attempt == self.cfg.pipeline.max_restarts or not self.replace_dead(catch_up=False):
                    raise
                self.log(f"{e}; replaced, calling {method} again")
        raise AssertionError("unreachable")

    def _learner_call(self, refs: list[Any], what: str) -> list[Any]:
        """Wait for a call on every rank; a dead or silent rank becomes LearnerLost."""
        import ray

        from pipeline.loop.remote import RoleTimeout, wait

        try:
            return wait(refs, f"learner ({what})", self.timeout)
        except (ray.exceptions.RayActorError, RoleTimeout) as e:
            raise LearnerLost(f"learner rank down during {what}: {str(e).splitlines()[0]}") from None

    def _learner_down(self) -> bool:
        return bool(self.dead(self.learners))

    def dead(self, actors: list[Any]) -> list[int]:
        """Indices of actors that are dead to Ray or do not answer a health ping within pipeline.health_timeout_s.
        The ping has a thread of its own in every actor, so a worker busy with a long call is not taken for dead."""
        import ray

        from pipeline.loop.remote import ping

        refs = [ping(a) for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.pipeline.health_timeout_s)
        out = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                out.append(i)
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                out.append(i)
        return out

    def stop(self, actor: Any) -> None:
        """Kill an actor for good (a frozen one too) and wait, bounded by pipeline.health_timeout_s each, until Ray
        reports it dead and, for a generator, until its processes (vLLM's engine core and workers, which hold the
        device memory) have exited (those that outlive it by that bound are killed), so that its replacement in
        the same bundle does not start beside them."""
        import time

        import ray

        from pipeline.loop.remote import end_processes, ping

        ray.kill(actor, no_restart=True)
        bound = self.cfg.pipeline.health_timeout_s
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            try:
                ray.get(ping(actor), timeout=1.0)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            time.sleep(0.2)
        known = self.processes.pop(actor._actor_id.hex(), None)
        if known is not None:
            killed, left = end_processes(*known, bound)
            if killed:
                self.log(f"killed {len(killed)} process(es) of a stopped generator that outlived it by {bound:.0f}s")
            if left:
                self.log(f"processes {left} of a stopped generator are still running; starting its replacement anyway")

    def remember_processes(self, actor: Any) -> None:
        """Note a started generator's processes (see `stop`)."""
        from pipeline.loop.remote import wait

        self.processes[actor._actor_id.hex()] = wait(actor.processes.remote(), "generator (its processes)",
                                                     self.timeout)

    # --- replace -------------------------------------------------------------------------------------------

    def replace_dead(self, catch_up: bool = True, hung: dict[str, set[int]] | None = None) -> int:
        """Replace every generator and scorer that is dead, frozen (no answer to a health ping), or named in
        `hung` (kind -> indices whose call outran pipeline.timeout_s); new receivers get the current weights (now,
        or with the next send when `catch_up` is False), new scorers any refit probes. Returns how many."""
        replaced = 0
        for kind, actors, make in (("generator", self.generators, self.new_generator),
                                   ("scorer", self.scorers, self.new_scorer)):
            stuck = (hung or {}).get(kind, set())
            for i in sorted(set(self.dead(actors)) | stuck):
                why = "did not finish a call within pipeline.timeout_s" if i in stuck else "is down"
                self.log(f"{kind} {i} {why}; starting a replacement (weights version {self.version})")
                self.stop(actors[i])  # a silent actor is stopped for good; a dead one is already gone
                actors[i] = self.bring_up(kind, make, i)
                replaced += 1
        if replaced and catch_up:
            self.catch_up()
        return replaced

    def bring_up(self, kind: str, make: Callable[[int], Any], index: int) -> Any:
        """Start worker `index` of `kind`, wait until it is ready, hand it any refit probes. (Its weights come
        after: `catch_up` gives every new receiver the current version at once.)"""
        from pipeline.loop.remote import wait

        actor = make(index)
        wait(actor.ready.remote(), f"{kind} {index} (start-up)", self.timeout)
        if kind == "generator":
            self.remember_processes(actor)
        self.admit(kind, index, actor)
        return actor

    def admit(self, kind: str, index: int, actor: Any) -> None:
        """What a started worker needs before it gets work: the probes refit during the run."""
        from pipeline.loop.remote import wait

        if kind in ("scorer", "generator"):
            reads = self.reads(kind)
            wait([self._set_probe(actor, kind).remote(name, tensors) for name, tensors in self.probe_overrides.items()
                  if name in reads], f"{kind} {index} (refit probes)", self.timeout)

    def _set_probe(self, actor, kind: str):
        """An actor's `set_probe`; a generator taking weights mid-generation takes probes the same way."""
        from pipeline.loop.remote import WEIGHTS

        if kind == "generator" and self.lands_mid_generation:
            return actor.set_probe.options(concurrency_group=WEIGHTS)
        return actor.set_probe

    def reads(self, kind: str) -> set[str]:
        """The probe readings a role holds by name: scorers their own, generators theirs, the evaluator every
        distinct probe (a generator reading with a scorer twin is the twin's probe)."""
        w = self.world
        own = {g.name for g in w.generator_probes}
        if kind == "generator":
            return own
        if kind == "scorer":
            return set(w.probe_names)
        return set(w.probe_names) | {g.name for g in w.generator_probes if g.twin is None}

    def set_probes(self, overrides: dict[str, dict]) -> None:
        """Every scorer, generator and the evaluator reads the probes in `overrides` it holds (name -> {"weight",
        "bias"}: refit during the run; generators copy them in place into vLLM's compiled forward), and the world's
        own probe for a name refit before but not in `overrides` (after a restart to a
        checkpoint taken before that refit)."""
        from pipeline.loop.remote import wait
        from probes.probe import load_probe

        send = dict(overrides)
        for name in set(self.probe_overrides) - set(overrides):
            probe = load_probe(self.world.probe_stem(name)[0])
            send[name] = {"weight": probe.weight, "bias": probe.bias}
        targets = [(a, "scorer") for a in self.scorers] + [(a, "generator") for a in self.generators]
        targets += [(self.evaluator, "evaluator")] if self.evaluator else []
        wait([self._set_probe(a, kind).remote(name, tensors) for a, kind in targets for name, tensors in send.items()
              if name in self.reads(kind)], "scorer (set probe)", self.timeout)
        self.probe_overrides = dict(overrides)

    # --- helpers for the loop ------------------------------------------------------------------------------

    def checkpoint(self, run_dir: Path) -> str:
        return self._learner_call([lr.save_checkpoint.remote(str(run_dir / "checkpoints")) for lr in self.learners],
                                  f"checkpoint of version {self.version}")[0]

    def train(self, batch: pa.Table) -> list[Any]:
        return self._learner_call([lr.train_step.remote(batch) for lr in self.learners],
                                  f"training version {self.version + 1}")

    def shutdown(self) -> None:
        """Stop every actor and free the placement groups (for a caller's Ray instance that outlives the run)."""
        import ray

        from pipeline.loop.remote import release

        for actor in self.generators + self.scorers + self.learners + [self.evaluator]:
            if actor is not None:
                ray.kill(actor)
        release(self.groups.values())


def setup_learners(learners: list[Any], timeout_s: float) -> None:
    """The ranks meet at rank 0's node: ask rank 0 for its address and a free port there, then set up all."""
    from pipeline.loop.remote import wait

    address, port = wait(learners[0].address.remote(), "learner rank 0 (address)", timeout_s)
    wait([a.setup.remote(address, port) for a in learners], "learner (start-up)", timeout_s)


class ScorerScaler:
    """Scorer count between scorer.num_workers and scorer.max_workers, by backlog: how long generated batches
    wait for a scorer, as a share of the step's span (first generation start to last scoring end).

    A new scorer starts without blocking the run and joins once it is up (on a cluster, once Ray can place
    it). A scorer is retired when, with one fewer, the rest would still be mostly idle and nothing waits;
    it first drains (gets no new chunks) and is stopped once no batch in flight uses it.
    """

    def __init__(self, fleet: Fleet, log: Callable[[str], None] = print) -> None:
        self.fleet, self.log, self.idle_steps = fleet, log, 0
        self.joining: tuple[int, Any, Any] | None = None  # (index, actor, its ready ref)

    def __call__(self, gen_stats, score_stats, pending) -> dict[str, float]:
        fleet, s = self.fleet, self.fleet.cfg.scorer
        if s.max_workers is None:
            return {"scorer/workers": float(len(fleet.scorers))}
        self._admit_joiner()
        self._stop_drained(pending)
        active = fleet.active_scorers or len(fleet.scorers)
        load = scorer_load(gen_stats, score_stats)
        move, self.idle_steps = scale_decision(load, active, self.joining is not None, self.idle_steps, s)
        if move > 0 and len(fleet.scorers) > active:  # a draining scorer is still there: take it back
            active += 1
        elif move > 0:
            index = len(fleet.scorers)
            actor = fleet.new_scorer(index)
            self.joining = (index, actor, actor.ready.remote())
            self.log(f"batches wait {load.backlog:.0%} of the step for a scorer: starting scorer {index}")
        elif move < 0:
            active -= 1
            self.log(f"scorers idle: retiring scorer {active} once it drains ({active + 1} -> {active})")
        fleet.active_scorers = active
        return {"scorer/workers": float(active), "scorer/backlog": load.backlog, "scorer/wait_s": load.wait_s,
                "scorer/busy_s": load.busy_s, "scorer/joining": float(self.joining is not None)}

    def _admit_joiner(self) -> None:
        import ray

        if self.joining is None:
            return
        index, actor, ready = self.joining
        done, _ = ray.wait([ready], timeout=0)
        if not done:
            return  # still starting, or waiting for Ray to place it: the run goes on without it
        self.joining = None
        fleet = self.fleet
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as e:
            self.log(f"scorer {index} failed to start ({str(e).splitlines()[0]}); it does not join")
            return
        fleet.admit("scorer", index, actor)
        fleet.scorers.append(actor)
        if fleet.cfg.scorer.model == "live":
            fleet.catch_up()
        fleet.active_scorers = (fleet.active_scorers or len(fleet.scorers) - 1) + 1
        self.log(f"scorer {index} joined: {fleet.active_scorers} scorer(s)")

    def _stop_drained(self, pending) -> None:
        import ray

        fleet = self.fleet
        active = fleet.active_scorers or len(fleet.scorers)
        busy = {c.scorer for f in pending for c in f.chunks}
        while len(fleet.scorers) > active and len(fleet.scorers) - 1 not in busy:  # drained: stop it
            ray.kill(fleet.scorers.pop())


@dataclass(frozen=True)
class ScorerLoad:
    """One step's scoring load, from the chunks' generator and scorer stats (wall-clock stamps)."""

    wait_s: float  # mean time a generated chunk waited for its scorer
    busy_s: float  # scorers' summed busy time
    span_s: float  # first generation start to last scoring end
    backlog: float  # wait_s / span_s


def scorer_load(gen_stats: list[GenerateStats], score_stats: list[ScoreStats]) -> ScorerLoad:
    start = min(g.end_time - g.seconds for g in gen_stats)
    span = max(max(sc.start_time + sc.seconds for sc in score_stats) - start, 1e-6)
    wait = float(np.mean([max(0.0, sc.start_time - g.end_time) for g, sc in zip(gen_stats, score_stats, strict=True)]))
    return ScorerLoad(wait, sum(sc.seconds for sc in score_stats), span, wait / span)


def scale_decision(load: ScorerLoad, active: int, joining: bool, idle_steps: int, cfg: ScorerConfig) -> tuple[int, int]:
    """(+1 add a scorer / -1 retire one / 0, idle steps so far) for scorer config `cfg` (ScorerConfig).

    Add one when chunks wait longer than `scale_up_wait` of the step (one joins at a time). Retire one after
    `scale_down_steps` steps in a row in which chunks waited less than half that and the others would be
    busy less than `scale_down_busy` of the step without it (the gap between the two waits keeps the count
    from flapping)."""
    if load.backlog > cfg.scale_up_wait:
        return (1 if active + joining < cfg.max_workers and not joining else 0), 0
    idle = (load.backlog < cfg.scale_up_wait / 2 and active > cfg.num_workers and not joining
            and load.busy_s / ((active - 1) * load.span_s) < cfg.scale_down_busy)
    if not idle:
        return 0, 0
    if idle_steps + 1 >= cfg.scale_down_steps:
        return -1, 0
    return 0, idle_steps + 1


def own_samples(cfg: Config, world: World) -> dict | None:
    """What the evaluator needs to sample the evaluated policy's own held-out completions (for the recalibrated
    recall), or None when the run measures no recalibration."""
    if not (cfg.eval.recalibrate_samples and cfg.task.ground_truth_fn and world.eval_prompts):
        return None
    return {"prompts": list(world.eval_prompts.prompts), "answers": list(world.eval_prompts.answers),
            "prompt_ids": [list(ids) for ids in world.eval_prompt_ids],
            "truth_args": world.eval_prompts.arguments(world.truth_args, list(range(len(world.eval_prompts)))),
            "truth_fn": cfg.task.ground_truth_fn, "samples": cfg.eval.recalibrate_samples,
            "max_new_tokens": cfg.generator.max_new_tokens, "temperature": cfg.generator.temperature}
