"""The fleet: every running role, and everything that keeps it alive.

`pipeline/driver.py` runs the training loop; this module owns the actors it talks to. It starts the roles
(each in its placement group), brings up a worker (start, wait until ready, give it the current weights
and any refit probes) for a replacement or a scale-up alike, replaces dead workers, and pushes each new
weight version to every receiver (generators, and scorers in live mode) over the configured transport.

With the collective transport the receivers and learner rank 0 form one transfer group. A group cannot
admit a member, so when the receivers change (a replacement, a scale-up) the fleet builds a new group
and sends the current version to all of it; a sync that fails because a receiver died or went silent is
repaired the same way. Every wait has a timeout and names the role (pipeline/remote.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import Config, weight_backend
from pipeline.world import World

QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class SyncFailed(RuntimeError):
    """A weight version could not reach every receiver, even after replacing the ones that were down."""


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

    @property
    def backend(self) -> str:
        return weight_backend(self.cfg)

    @property
    def timeout(self) -> float:
        return self.cfg.pipeline.timeout_s

    # --- start -----------------------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: Config, world: World, log=print) -> Fleet:
        """Reserve every role's placement group (failing fast, naming the role), start all roles, wait."""
        from pipeline.remote import wait

        fleet = cls(cfg, world, log)
        g, s, lc = cfg.generator, cfg.scorer, cfg.learner
        log(f"starting {g.num_workers} generator(s), {s.num_workers} scorer(s), {lc.num_ranks} learner rank(s); "
            f"weights: {cfg.weights.transport} ({fleet.backend})")
        fleet.reserve()
        fleet.generators = [fleet.new_generator(i) for i in range(g.num_workers)]
        fleet.scorers = [fleet.new_scorer(i) for i in range(s.num_workers)]
        fleet.start_learners()
        if cfg.eval.every:
            from actors.evaluator import ProbeEvaluator

            fleet.evaluator = fleet._make(ProbeEvaluator, "evaluator", cfg.eval, 0, dict(
                model_path=world.model_path, probe_paths=world.probe_paths, labelled=world.eval_labelled,
                dtype=cfg.model.dtype, pad_id=world.pad_id, seed=cfg.pipeline.seed))
            wait(fleet.evaluator.ready.remote(), "evaluator (start-up)", fleet.timeout)
        wait([a.ready.remote() for a in fleet.scorers], "scorer (start-up)", fleet.timeout)
        wait([a.ready.remote() for a in fleet.generators], "generator (start-up)", fleet.timeout)
        return fleet

    def reserve(self) -> None:
        from pipeline.remote import Resources, check_fits, release, reserve

        need = {role: (n, Resources(rc.num_cpus, rc.num_gpus, rc.memory_gib)) for role, n, rc in self.cfg.roles()}
        check_fits([(role, n, res) for role, (n, res) in need.items()])  # fail fast, naming the role
        try:
            for role, (n, res) in need.items():
                self.groups[role] = reserve(role, n, res, self.timeout, "PACK" if role == "learner" else "SPREAD")
        except ValueError:
            release(self.groups.values())
            raise

    def _make(self, cls: type, role: str, rc, index: int | None, kwargs: dict):
        from pipeline.remote import make_actor

        group = self.groups.get(role)
        placement = (group, index) if group is not None and index is not None and index < group.count else None
        return make_actor(cls, role, rc.num_cpus, rc.num_gpus, env=QUIET_ENV, placement=placement,
                          memory_gib=rc.memory_gib, **kwargs)

    def new_generator(self, i: int):
        from actors.generator import Generator

        cfg = self.cfg
        return self._make(Generator, "generator", cfg.generator, i, dict(
            model_path=self.world.model_path, cfg=cfg.generator, weight_backend=self.backend, dtype=cfg.model.dtype,
            seed=cfg.pipeline.seed + i))

    def new_scorer(self, i: int):
        """Scorer i; those beyond scorer.num_workers (a scale-up) are placed outside the role's group."""
        from actors.scorer import Scorer

        cfg = self.cfg
        return self._make(Scorer, "scorer", cfg.scorer, i, dict(
            model_path=self.world.model_path, probe_paths=self.world.probe_paths, cfg=cfg.scorer,
            compute_ref=cfg.learner.kl_coef > 0, dtype=cfg.model.dtype, pad_id=self.world.pad_id,
            weight_backend=self.backend))

    def start_learners(self) -> None:
        """Start every rank, then let them meet at rank 0's node (so ranks may sit on different nodes)."""
        from learner.learner import Learner

        cfg, lc = self.cfg, self.cfg.learner
        rows = cfg.pipeline.prompts_per_step * cfg.pipeline.group_size
        self.learners = [self._make(Learner, "learner", lc, r, dict(
            model_path=self.world.model_path, cfg=lc, rows_per_step=rows, rank=r, world_size=lc.num_ranks,
            dtype=cfg.model.dtype, pad_id=self.world.pad_id)) for r in range(lc.num_ranks)]
        setup_learners(self.learners, self.timeout)
        self.transfer_members = ()  # new ranks hold no transfer group yet

    # --- weights -----------------------------------------------------------------------------------------

    def receivers(self) -> list[Any]:
        from pipeline.remote import Receiver

        out = [Receiver(f"generator {i}", a, self.cfg.generator.tensor_parallel_size)
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

        from pipeline.remote import wait

        wire = wait([lr.get_weights.remote() for lr in self.learners], f"learner (weights version {version})",
                    self.timeout)[0]
        assert wire.version == version, (wire.version, version)
        self.weights_ref = ray.put(wire)
        self.pending_loads = [r.actor.load_weights.remote(self.weights_ref, version) for r in self.receivers()]
        self.version = version

    def settle_loads(self) -> None:
        """Object store: wait for the queued loads (a dead receiver's replacement gets the weights anyway)."""
        from pipeline.remote import PeerDied, wait_each

        refs, self.pending_loads = self.pending_loads, []
        for ref in refs:
            try:
                wait_each([ref], ["a receiver"], f"loading weights version {self.version}", self.timeout)
            except PeerDied:
                pass

    def _send(self, version: int) -> None:
        from pipeline.remote import PeerDied, PeerFailed, RoleTimeout, wait_each

        for attempt in range(self.cfg.pipeline.max_restarts + 1):
            try:
                self._ensure_transfer_group(version)
                names = [f"learner rank {r}" for r in range(len(self.learners))]
                stats = wait_each([lr.send_weights.remote() for lr in self.learners], names,
                                  f"send_weights (weights version {version})", self.timeout)
                self.last_sync, self.version = stats[0], version
                return
            except (PeerFailed, PeerDied, RoleTimeout) as e:
                if self._learner_down():
                    raise
                replaced = self.replace_dead(catch_up=False)
                if not replaced or attempt == self.cfg.pipeline.max_restarts:
                    raise SyncFailed(f"weights version {version} did not reach every receiver: {e}") from None
                self.log(f"weights version {version}: {e}; replaced {replaced} receiver(s), resending")
                self.transfer_members = ()  # rebuild the group with the replacements

    def _ensure_transfer_group(self, version: int) -> None:
        """Build a new transfer group when the receivers changed since the last one."""
        from pipeline.remote import ReceiverClient, wait_each

        receivers = self.receivers()
        members = tuple(r.actor for r in receivers)
        if members == self.transfer_members:
            return
        self.incarnation += 1
        client = ReceiverClient(receivers, self.timeout)
        client.version = version
        w = self.cfg.weights
        names = [f"learner rank {r}" for r in range(len(self.learners))]
        wait_each([lr.init_weight_transfer.remote(client, self.backend, int(w.bucket_mb * 2**20), w.timeout_s,
                                                  f"probe-rl-weights-{self.incarnation}") for lr in self.learners],
                  names, f"init_weight_transfer (group {self.incarnation}, weights version {version})", self.timeout)
        self.transfer_members = members

    def catch_up(self) -> None:
        """Give receivers started since the last sync the current weights before they get any work."""
        from pipeline.remote import wait

        if self.version == 0:
            return  # they loaded the initial weights themselves
        if self.cfg.weights.transport == "object_store":
            wait([r.actor.load_weights.remote(self.weights_ref, self.version) for r in self.receivers()],
                 f"receivers (catching up to weights version {self.version})", self.timeout)
        else:
            self._send(self.version)

    def _learner_down(self) -> bool:
        return bool(self.dead(self.learners))

    def dead(self, actors: list[Any], timeout: float | None = None) -> list[int]:
        """Indices of actors that are dead or do not answer a ping within `timeout`."""
        import ray

        refs = [a.ready.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout or min(self.timeout, 60.0))
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

    # --- replace -------------------------------------------------------------------------------------------

    def replace_dead(self, catch_up: bool = True) -> int:
        """Replace every dead or silent generator and scorer; new receivers get the current weights (now, or
        with the next send when `catch_up` is False), new scorers any refit probes. Returns how many."""
        import ray

        replaced = 0
        for kind, actors, make in (("generator", self.generators, self.new_generator),
                                   ("scorer", self.scorers, self.new_scorer)):
            for i in self.dead(actors):
                self.log(f"{kind} {i} is down; starting a replacement (weights version {self.version})")
                ray.kill(actors[i])  # a silent actor is stopped for good; a dead one is already gone
                actors[i] = self.bring_up(kind, make, i)
                replaced += 1
        if replaced and catch_up:
            self.catch_up()
        return replaced

    def bring_up(self, kind: str, make, index: int):
        """Start worker `index` of `kind`, wait until it is ready, hand it any refit probes."""
        from pipeline.remote import wait

        actor = make(index)
        wait(actor.ready.remote(), f"{kind} {index} (start-up)", self.timeout)
        if kind == "scorer":
            wait([actor.set_probe.remote(name, tensors) for name, tensors in self.probe_overrides.items()],
                 f"scorer {index} (refit probes)", self.timeout)
        return actor

    # --- helpers for the loop ------------------------------------------------------------------------------

    def checkpoint(self, run_dir) -> str:
        from pipeline.remote import wait

        return wait([lr.save_checkpoint.remote(str(run_dir / "checkpoints")) for lr in self.learners],
                    f"learner (checkpoint of version {self.version})", self.timeout)[0]

    def train(self, batch: pa.Table) -> list[Any]:
        from pipeline.remote import wait

        return wait([lr.train_step.remote(batch) for lr in self.learners], "learner", self.timeout)

    def shutdown(self) -> None:
        """Stop every actor and free the placement groups (for a caller's Ray instance that outlives the run)."""
        import ray

        from pipeline.remote import release

        for actor in self.generators + self.scorers + self.learners + [self.evaluator]:
            if actor is not None:
                ray.kill(actor)
        release(self.groups.values())


def setup_learners(learners: list[Any], timeout_s: float) -> None:
    """The ranks meet at rank 0's node: ask rank 0 for its address and a free port there, then set up all."""
    from pipeline.remote import wait

    address, port = wait(learners[0].address.remote(), "learner rank 0 (address)", timeout_s)
    wait([a.setup.remote(address, port) for a in learners], "learner (start-up)", timeout_s)
