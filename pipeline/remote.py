"""The one place where plain classes become Ray actors, and every remote wait gets a timeout.

Roles are plain classes (actors/, learner/); `make_actor` wraps one with `ray.remote` and the
role's resources. `wait` is the only way the driver blocks on a remote result: a hang becomes a
`RoleTimeout` that names the role instead of a silent stall.
"""

from __future__ import annotations

import socket
from typing import Any

import ray


class RoleTimeout(RuntimeError):
    pass


def make_actor(cls: type, role: str, num_cpus: float, num_gpus: float, env: dict[str, str] | None = None,
               *args: Any, **kwargs: Any):
    """Start `cls(*args, **kwargs)` as a Ray actor named after its role, with the role's resources."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return ray.remote(**opts)(cls).options(name=None).remote(*args, **kwargs)


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
