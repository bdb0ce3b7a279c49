"""The one place where plain classes become Ray actors, and every remote wait gets a timeout.

Roles are plain classes (actors/, learner/); `make_actor` wraps one with `ray.remote` and the
role's resources, inside the role's placement group when it has one (`reserve`). `wait` is the only
way the driver blocks on a remote result: a hang becomes a `RoleTimeout` that names the role
instead of a silent stall.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray


class RoleTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float = 0.0
    memory_gib: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)  # custom Ray resources (node labels, device kinds)

    @classmethod
    def of(cls, rc) -> Resources:
        """A role config's resources (pipeline.config.RoleResources)."""
        return cls(rc.num_cpus, rc.num_gpus, rc.memory_gib, dict(rc.resources))

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


def make_actor(cls: type, role: str, num_cpus: float, num_gpus: float = 0.0, *, memory_gib: float = 0.0,
               resources: dict[str, float] | None = None, env: dict[str, str] | None = None,
               placement: tuple[Placement, int] | None = None, **kwargs: Any):
    """Start `cls(**kwargs)` as a Ray actor with the role's resources (in bundle i of its group)."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1}
    if memory_gib:
        opts["memory"] = memory_gib * 2**30
    if resources:
        opts["resources"] = dict(resources)
    if env:
        opts["runtime_env"] = {"env_vars": env}
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


def _first_failure(refs: list[Any], timeout_s: float, on_timeout, on_error=None) -> None:
    """Wait until every ref is ready; raise the first error among them as soon as it is ready (through
    `on_error(ref, error)` when given, which returns the exception to raise)."""
    deadline = time.monotonic() + timeout_s
    remaining = [r for r in refs if isinstance(r, ray.ObjectRef)]
    while remaining:
        left = deadline - time.monotonic()
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(left, 0), fetch_local=False)
        if not ready:
            raise on_timeout(remaining[0])
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as e:
            if on_error is None:
                raise
            raise on_error(ready[0], e) from None


def release(groups) -> None:
    """Remove these placement groups (`Placement`s)."""
    from ray.util.placement_group import remove_placement_group

    for placement in groups:
        remove_placement_group(placement.group)


def wait_each(refs: list[Any], names: list[str], what: str, timeout_s: float) -> list[Any]:
    """Results of `refs` (one per named role) within one deadline, failing fast; the error names the first
    role that is dead, silent or failing, and `what` it was asked (e.g. "update_weights (weights version 3)")."""
    name_of = dict(zip(refs, names, strict=True))

    def silent(ref):
        return RoleTimeout(f"{name_of[ref]} did not answer {what} within {timeout_s:.0f}s: it is hung, stopped, or "
                           "waiting on something that is")

    def failed(ref, e: Exception):
        if isinstance(e, ray.exceptions.RayActorError):
            return PeerDied(f"{name_of[ref]} died during {what}: {str(e).splitlines()[0]}")
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
        return PeerFailed(f"{name_of[ref]} failed during {what}: {cause}")

    _first_failure(list(refs), timeout_s, silent, failed)
    return ray.get(list(refs))


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


class ReceiverClient:
    """vLLM's `VLLMWeightSyncClient` protocol over receiver actors (generators, live scorers).

    A trainer-side engine (vLLM's NCCL one, or probe-rl's gloo one) drives a weight update through these four
    calls. Each fans out to every receiver and waits with a timeout; an error names the receiver and the
    weights version. Each receiver gets its own transfer-group rank offset: the sender is rank 0, then every
    receiver's workers (tensor-parallel engines hold several) in order.
    """

    def __init__(self, receivers: list[Receiver], timeout_s: float) -> None:
        self.receivers, self.timeout_s = receivers, timeout_s
        self.version = 0  # the version being sent; the learner sets it before each send

    @property
    def num_ranks(self) -> int:
        return sum(r.num_ranks for r in self.receivers)

    def _all(self, method: str, *per_receiver_args) -> list[Any]:
        refs = [getattr(r.actor, method).remote(*(args[i] for args in per_receiver_args))
                for i, r in enumerate(self.receivers)]
        return wait_each(refs, [r.name for r in self.receivers], f"{method} (weights version {self.version})",
                         self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        # Every receiver first finishes what it is doing (a generation in flight), so the rendezvous below is
        # bounded by the transfer timeout alone.
        self._all("ready")
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


def free_port() -> int:
    """A free TCP port on this node."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    """This node's address as Ray knows it (what other nodes reach it at)."""
    return ray.util.get_node_ip_address()
