"""The one place where plain classes become Ray actors, and every remote wait gets a timeout.

Roles are plain classes (actors/, learner/); `make_actor` wraps one with `ray.remote` and the
role's resources, inside the role's placement group when it has one (`reserve`). `wait` is the only
way the driver blocks on a remote result: a hang becomes a `RoleTimeout` that names the role
instead of a silent stall.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import ray


class RoleTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float = 0.0
    memory_gib: float = 0.0

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus}
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


def make_actor(cls: type, role: str, num_cpus: float, num_gpus: float, env: dict[str, str] | None = None,
               *args: Any, placement: tuple[Placement, int] | None = None, memory_gib: float = 0.0, **kwargs: Any):
    """Start `cls(*args, **kwargs)` as a Ray actor with the role's resources (in bundle i of its group)."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1}
    if memory_gib:
        opts["memory"] = memory_gib * 2**30
    if env:
        opts["runtime_env"] = {"env_vars": env}
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, index = placement
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group.group, placement_group_bundle_index=index)
    return ray.remote(**opts)(cls).remote(*args, **kwargs)


def wait(refs: Any, role: str, timeout_s: float) -> Any:
    """ray.get with a timeout; the error names the role that did not answer."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RoleTimeout(
            f"{role} did not answer within {timeout_s:.0f}s (pipeline.timeout_s); it may be hung or out of resources"
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
