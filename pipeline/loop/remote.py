"""The one place where plain classes become Ray actors, and every remote wait gets a timeout; and how a run
joins Ray (`init_ray`: the cluster it was given, or a new local instance).

Roles are plain classes (actors/, learner/); `make_actor` wraps one with `ray.remote` and the
role's resources, inside the role's placement group when it has one (`reserve`). `wait` is the only
way the driver blocks on a remote result: a hang becomes a `RoleTimeout` that names the role
instead of a silent stall.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from ray import ObjectRef

    from pipeline.config import Config, RoleResources


class RoleTimeout(RuntimeError):
    pass


class Frozen(RoleTimeout):
    """A role's process does not answer health pings: stopped, or stuck beyond its own threads."""


HEALTH = "health"  # every actor's concurrency group for health pings: a thread of its own, never behind work
WEIGHTS = "weights"  # weight calls to a generator whose updates land mid-generation (generator.update_mode)
STREAM = "stream"  # a continuous generator's admit and take calls: several takes wait at once, in any order
STREAM_THREADS = 16  # threads of that group: more than the chunks a generator holds (chunks a step x staleness)


def ping(actor: Any) -> ObjectRef:
    """A health ping (the role's `pid`) that does not queue behind the actor's work: a generation that runs for
    minutes still answers it at once; a dead or frozen process does not."""
    return actor.pid.options(concurrency_group=HEALTH).remote()


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float = 0.0
    memory_gib: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)  # custom Ray resources (node labels, device kinds)

    @classmethod
    def of(cls, rc: RoleResources) -> Resources:
        """A role config's resources (pipeline.config.RoleResources)."""
        return cls(rc.num_cpus, rc.num_gpus, rc.memory_gib, dict(rc.resources))

    def __add__(self, other: Resources) -> Resources:
        """What two workers sharing one bundle reserve together (pipeline.colocate on GPUs)."""
        custom = {k: self.custom.get(k, 0.0) + other.custom.get(k, 0.0) for k in {*self.custom, *other.custom}}
        return Resources(self.num_cpus + other.num_cpus, self.num_gpus + other.num_gpus,
                         self.memory_gib + other.memory_gib, custom)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus, **self.custom}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        if self.memory_gib:
            b["memory"] = self.memory_gib * 2**30
        return b


@dataclass(frozen=True)
class Placement:
    """A role's placement group: bundle i holds worker i."""

    group: Any
    count: int


def check_fits(roles: list[tuple[str, int, Resources]]) -> None:
    """Fail before anything starts when the cluster's totals cannot hold the roles, naming the first that
    does not fit and the numbers."""
    total = ray.cluster_resources()
    used: dict[str, float] = {}
    for role, count, res in roles:
        for key, amount in res.bundle().items():
            used[key] = used.get(key, 0.0) + amount * count
            have = total.get(key, 0.0)
            if used[key] > have + 1e-9:
                unit = " GiB" if key == "memory" else ""
                scale = 2**30 if key == "memory" else 1
                raise ValueError(
                    f"{role}: {count} x {amount / scale:g}{unit} {key} brings the run to {used[key] / scale:g}{unit} "
                    f"{key}, but the Ray cluster has {have / scale:g}{unit} {key} in all; lower the role's count or "
                    "resources in the config, or add nodes")


def reserve(role: str, count: int, res: Resources, timeout_s: float, strategy: str = "PACK") -> Placement:
    """A placement group with one bundle per worker; an error naming the role if it cannot be placed."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([res.bundle()] * count, strategy=strategy, name=f"probe-rl-{role}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ValueError(f"{role}: could not place {count} x {res.bundle()} within {timeout_s:.0f}s; the cluster "
                         f"has these free: {ray.available_resources()}") from None
    return Placement(group, count)


def _in_env(cls: type, env: dict[str, str]) -> type:
    """`cls` (same name, so Ray titles its process `ray::<Class>` as before) whose instance first sets `env` in its
    process's environment, before the role imports vLLM or transformers, which read it once. Not a per-actor
    `runtime_env`: that makes Ray start every such worker through a set-up process of its own (about half a
    CPU-second more per actor) and keeps it from using a worker the node started in advance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ.update(env)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


def make_actor(cls: type, role: str, num_cpus: float, num_gpus: float = 0.0, *, memory_gib: float = 0.0,
               resources: dict[str, float] | None = None, env: dict[str, str] | None = None,
               placement: tuple[Placement, int] | None = None, out_of_order: bool = False, **kwargs: Any) -> Any:
    """Start `cls(**kwargs)` as a Ray actor with the role's resources (in bundle i of its group), `env` set in its
    process's environment before it starts. `out_of_order`: its calls run as their arguments become ready, not
    in the order they were sent (still one at a time)."""
    # Work runs one call at a time; health pings (`ping`) have a concurrency group of their own, and so do weight
    # calls that must reach a generator while it generates (the generator itself lets them in between steps).
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1,
                            "concurrency_groups": {HEALTH: 1, WEIGHTS: 1, STREAM: STREAM_THREADS}}
    if out_of_order:
        opts["allow_out_of_order_execution"] = True
    if memory_gib:
        opts["memory"] = memory_gib * 2**30
    if resources:
        opts["resources"] = dict(resources)
    if env:
        cls = _in_env(cls, env)
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, index = placement
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group.group, placement_group_bundle_index=index)
    return ray.remote(**opts)(cls).remote(**kwargs)


def wait(refs: Any, role: str, timeout_s: float) -> Any:
    """ray.get with a timeout that fails fast: the first result that is an error (a dead actor, a lost object,
    a raised exception) is raised as soon as it arrives, not after every other ref; a hang becomes a
    RoleTimeout naming the role."""
    single = not isinstance(refs, list)
    items = [refs] if single else list(refs)
    _first_failure(items, timeout_s, lambda ref: RoleTimeout(
        f"{role} did not answer within {timeout_s:.0f}s (pipeline.timeout_s); it may be hung or out of resources"))
    values = ray.get(items)
    return values[0] if single else values


def _first_failure(refs: list[Any], timeout_s: float, on_timeout, on_error=None, check=None,
                   every_s: float = 0.0) -> None:
    """Wait until every ref is ready; raise the first error among them as soon as it is ready (through
    `on_error(ref, error)` when given, which returns the exception to raise). With `check`, every `every_s`
    seconds without a result, `check(remaining refs)` runs and may raise (a health check of their workers)."""
    deadline = time.monotonic() + timeout_s
    remaining = [r for r in refs if isinstance(r, ray.ObjectRef)]
    while remaining:
        left = deadline - time.monotonic()
        step = min(left, every_s) if check is not None else left
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(step, 0), fetch_local=False)
        if not ready:
            if check is None or time.monotonic() >= deadline - 1e-3:
                raise on_timeout(remaining[0])
            check(remaining)
            continue
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as e:
            if on_error is None:
                raise
            raise on_error(ready[0], e) from None


def release(groups: list[Placement]) -> None:
    """Remove these placement groups (`Placement`s)."""
    from ray.util.placement_group import remove_placement_group

    seen = set()
    for placement in groups:  # colocated roles share one group: removed once
        if id(placement.group) not in seen:
            seen.add(id(placement.group))
            remove_placement_group(placement.group)


def wait_each(refs: list[Any], names: list[str], what: str, timeout_s: float, actors: list[Any] | None = None,
              health_timeout_s: float = 0.0) -> list[Any]:
    """Results of `refs` (one per named role) within one deadline, failing fast; the error names the first
    role that is dead, silent or failing, and `what` it was asked (e.g. "update_weights (weights version 3)").

    With `actors` (the roles' actors, in the same order; a list of actors where a result needs several), a call
    may run up to `timeout_s` only while its actors answer health pings (`ping`, every `health_timeout_s`): a
    frozen actor fails the wait (`Frozen`) within about twice `health_timeout_s`, however long the call may take."""
    name_of = dict(zip(refs, names, strict=True))

    def silent(ref):
        return RoleTimeout(f"{name_of[ref]} did not answer {what} within {timeout_s:.0f}s: it is hung, stopped, or "
                           "waiting on something that is")

    def failed(ref, e: Exception):
        if isinstance(e, ray.exceptions.RayActorError):
            return PeerDied(f"{name_of[ref]} died during {what}: {str(e).splitlines()[0]}")
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
        return PeerFailed(f"{name_of[ref]} failed during {what}: {cause}")

    check = _health_check(refs, names, actors, what, health_timeout_s) if actors is not None else None
    _first_failure(list(refs), timeout_s, silent, failed, check, health_timeout_s)
    return ray.get(list(refs))


def wait_watched(refs: list[Any], names: list[str], what: str, timeout_s: float, actors: list[Any],
                 health_timeout_s: float) -> list[Any]:
    """Like `wait` (Ray's own errors raised as they come), with `wait_each`'s health watch of the actors behind
    each ref: `Frozen` for an actor that stops answering pings, `RoleTimeout` past `timeout_s`."""
    def late(ref):
        return RoleTimeout(f"{dict(zip(refs, names, strict=True))[ref]} did not finish {what} within "
                           f"{timeout_s:.0f}s (pipeline.timeout_s)")

    _first_failure(list(refs), timeout_s, late, None, _health_check(refs, names, actors, what, health_timeout_s),
                   health_timeout_s)
    return ray.get(list(refs))


def _health_check(refs: list[Any], names: list[str], actors: list[Any], what: str, health_timeout_s: float):
    """A check for `_first_failure`: ping the actors behind the refs still pending; `Frozen` names the first ref
    one of whose actors does not answer within `health_timeout_s`."""
    name_of = dict(zip(refs, names, strict=True))
    actor_of = dict(zip(refs, actors, strict=True))

    def check(remaining):
        pings = [(ref, ping(a)) for ref in remaining
                 for a in (actor_of[ref] if isinstance(actor_of[ref], list) else [actor_of[ref]])]
        answered, _ = ray.wait([p for _, p in pings], num_returns=len(pings), timeout=health_timeout_s)
        for ref, p in pings:
            if p not in answered:
                raise Frozen(f"{name_of[ref]} is frozen during {what}: no answer to a health ping within "
                             f"{health_timeout_s:.0f}s (pipeline.health_timeout_s)")

    return check


class PeerDied(RuntimeError):
    """A role's actor died (its process or node is gone)."""


class PeerFailed(RuntimeError):
    """A role's call raised."""


@dataclass
class Receiver:
    """A weight receiver as the transfer client sees it: a name for messages, an actor, its transfer ranks."""

    name: str
    actor: Any
    num_ranks: int = 1
    group: str | None = None  # the concurrency group its weight calls go to (None: behind its work)

    def call(self, method: str) -> Any:
        """The actor's method `method`, in the receiver's concurrency group."""
        m = getattr(self.actor, method)
        return m.options(concurrency_group=self.group) if self.group else m


class ReceiverClient:
    """vLLM's `VLLMWeightSyncClient` protocol over receiver actors (generators, live scorers).

    A trainer-side engine (vLLM's NCCL one, or probe-rl's gloo one) drives a weight update through these four
    calls. Each fans out to every receiver and waits with a timeout; an error names the receiver and the
    weights version. Each receiver gets its own transfer-group rank offset: the sender is rank 0, then every
    receiver's workers (tensor-parallel engines hold several) in order. Every call is watched by health pings
    (`ping`, answered at once by a live process even mid-generation): a frozen receiver is named as the fault
    within about twice `health_timeout_s` instead of stalling the sender for the whole call timeout.
    """

    def __init__(self, receivers: list[Receiver], timeout_s: float, health_timeout_s: float = 30.0) -> None:
        self.receivers, self.timeout_s, self.health_timeout_s = receivers, timeout_s, health_timeout_s
        self.version = 0  # the version being sent; the learner sets it before each send
        self._pending: list[tuple[str, Any]] = []  # (receiver name, ref) of the call being waited on

    @property
    def num_ranks(self) -> int:
        return sum(r.num_ranks for r in self.receivers)

    def _all(self, method: str, *per_receiver_args) -> list[Any]:
        refs = [r.call(method).remote(*(args[i] for args in per_receiver_args)) for i, r in enumerate(self.receivers)]
        names = [r.name for r in self.receivers]
        self._pending = list(zip(names, refs, strict=True))
        return wait_each(refs, names, f"{method} (weights version {self.version})", self.timeout_s,
                         [r.actor for r in self.receivers], self.health_timeout_s)

    def unfinished(self) -> list[str]:
        """The receivers whose current call has not returned (for an error that names them)."""
        return [name for name, ref in self._pending if not ray.wait([ref], timeout=0)[0]]

    def prepare(self) -> None:
        """Every receiver alive (a health ping within health_timeout_s) and done with what it is doing (a
        generation in flight: bounded by the call timeout), so a rendezvous after this is bounded by the
        transfer timeout alone."""
        wait_each([ping(r.actor) for r in self.receivers], [r.name for r in self.receivers],
                  f"a health ping before weights version {self.version}", self.health_timeout_s)
        self._all("ready")

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.prepare()
        offsets, rank = [], 1
        for r in self.receivers:
            offsets.append({**init_info, "rank_offset": rank})
            rank += r.num_ranks
        self._all("init_weight_transfer_engine", offsets)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [update_info] * len(self.receivers))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = str(weight_version if weight_version is not None else self.version)
        self._all("finish_weight_update", [version] * len(self.receivers))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")


def free_port(host: str = "") -> int:
    """A free TCP port on this node (on `host`'s interface; every interface when empty)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_address() -> str:
    """This node's address as Ray knows it (what other nodes reach it at)."""
    return ray.util.get_node_ip_address()


def end_processes(node_id: str, pids: list[int], grace_s: float) -> tuple[list[int], list[int]]:
    """Make sure none of `pids` runs on node `node_id` any more (a task placed on that node): wait `grace_s` for
    them to exit, then SIGKILL those left (a stopped actor's vLLM workers, say) and wait for them a little.
    Returns (pids killed, pids still running). A node that is gone has none left."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def end(pids: list[int], grace_s: float) -> tuple[list[int], list[int]]:
        import os
        import signal

        import psutil

        def alive() -> list[int]:
            out = []
            for p in pids:
                try:
                    if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = alive()
        for p in killed:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return killed, alive()

    task = ray.remote(num_cpus=0)(end).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(task.remote(pids, grace_s), timeout=grace_s + 60)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return [], []  # the node is gone, and its processes with it


def bind_address() -> str:
    """Where probe-rl's own torch.distributed stores and gloo sockets listen on this node: loopback while every
    Ray node of the cluster is on this machine (a local run, or a test cluster of several raylets), so nothing
    outside the machine can reach them; else this node's address, which the other nodes must reach (the
    docs/cluster.md lists these ports and what guards them)."""
    here = node_address()
    nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    return "127.0.0.1" if nodes <= {here} else here


# A new local instance starts no worker in advance (Ray would start one per CPU, and the roles, each started
# once and kept, would not use them: they would only cost start-up CPU and memory).
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def init_ray(cfg: Config) -> None:
    """Join the cluster at run.ray_address (or RAY_ADDRESS, set inside a submitted job), else start a new local
    instance sized to the roles."""
    from pipeline.config import cluster_address

    address = cluster_address(cfg.run.ray_address)  # RAY_ADDRESS is set inside a submitted Ray job
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local instance with the CPUs the roles reserve (they share real cores; scorers up to scorer.max_workers)
    # and no dashboard. Ray 2.60 resolves a loopback node address to the machine's own and binds its servers to
    # every interface; its token authentication (on by default, token in ~/.ray/auth_token) keeps other hosts
    # out (tests/integration/test_exposure.py). address="local": a new instance of its own, never a cluster that
    # `ray start` (or Ray's test cluster) happened to leave registered on this machine.
    ray.init(address="local", num_cpus=math.ceil(cfg.reserved_cpus()), include_dashboard=False, log_to_driver=True,
             configure_logging=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
