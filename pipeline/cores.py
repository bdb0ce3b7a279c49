"""Threads that follow the phase: a role that waits leaves its cores to a role that works.

Ray reserves CPUs per actor (`<role>.num_cpus`), and with `pipeline.cores = "reserved"` each role computes on that
many threads whatever the others do: on a 2-core machine running SmolLM2 the learner trains on one thread for
~34 s of every step while the generator and the scorer, done after ~15 s, hold the other core idle. With
`pipeline.cores = "phase"` every role process on a node marks itself busy, with its reservation, in a small
node-local ledger while it works (a file per process in shared memory, named by the Ray job), and before each unit
of work (a generate call, a scoring batch, a learner micro-batch) sets its thread count to its own reservation plus
the node's cores that no busy role holds. With `pipeline.max_staleness = 0` the phases never overlap, so each
takes every core in turn (`pipeline.colocate`).

Why threads and not Ray resources: Ray's reservations are fixed for an actor's lifetime, and a phase lasts
seconds; a thread count is set per call at no cost. The policy never takes a core a busy role reserved, so a
role is never slower than with "reserved" (short of the moments between a role's check and another's start:
the next unit of work corrects it), and the run's numbers do not change: torch's CPU kernels give the same results
at any thread count on the hosts tested (`tests/unit/test_cores.py` checks a model's pass and gradients at 1 and 2
threads). An entry of a process that died (SIGKILL) is recognised by its pid and ignored.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CORES_ENV = "PROBE_RL_CORES"  # pipeline.cores, in each role's environment (the fleet sets it when it starts one)


def node_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" (no limit) or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, and not a zombie (a killed process its parent has not reaped yet, as a
    container's first process may never do)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): the signal check is all there is
        return True


def set_threads(n: int) -> None:
    """torch's intra-op threads of the calling thread. vLLM's CPU worker replaces `torch.set_num_threads` with a
    no-op once it has bound its threads; the underlying call still works, and an engine started with
    VLLM_CPU_OMP_THREADS_BIND=nobind (probe-rl's) is bound to nothing."""
    import torch

    if torch.get_num_threads() != n:
        torch._C.set_num_threads(n)


class CoreShare:
    """One role process's part in its node's ledger. `reserved`: the CPUs Ray reserved for it (its threads when
    another role holds the rest); `key`: names the ledger (every role of one run, on one node, uses the same);
    `phase` False: always `reserved` threads, nothing written (pipeline.cores = "reserved")."""

    def __init__(self, reserved: float, key: str | None, phase: bool, cores: int | None = None,
                 root: str | Path | None = None, cpu: bool = True) -> None:
        self.cpu = cpu  # False: a GPU role, whose threads are left as they are
        self.own = max(1, math.ceil(reserved))
        self.cores = cores or node_cores()
        self.dir = None
        if phase and key and cpu:
            base = Path(root) if root else Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
            self.dir = base / f"probe-rl-cores-{key}"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.entry = self.dir / str(os.getpid()) if self.dir else None
        self.fitted: list[int] = []  # thread counts fitted in the current (or last) `working` block

    @property
    def phase(self) -> bool:
        """Whether this share follows the phase (a CPU role with pipeline.cores = "phase" under Ray)."""
        return self.dir is not None

    @classmethod
    def for_role(cls, reserved: float, cpu: bool = True) -> CoreShare:
        """The share of a role running as a Ray actor, by pipeline.cores in its environment: the ledger is named
        by the run's Ray job (outside Ray there is no one to share with: the reservation). `cpu` False: a role
        computing on a GPU, whose threads are left alone."""
        phase, key = os.environ.get(CORES_ENV) == "phase", None
        if phase:
            try:
                import ray

                if ray.is_initialized():
                    key = ray.get_runtime_context().get_job_id()
            except Exception:  # noqa: BLE001 - no Ray context: no one to share with
                key = None
        return cls(reserved, key, phase, cpu=cpu)

    def busy(self) -> int:
        """Cores that busy roles of this node reserve, this process included when it is busy."""
        if self.dir is None:
            return self.own
        held = 0
        for path in self.dir.iterdir():
            try:
                pid, threads = int(path.name), int(path.read_text() or 0)
            except (OSError, ValueError):  # being written or removed meanwhile
                continue
            if _alive(pid):
                held += threads
            else:  # its process was killed while busy: its cores are free
                path.unlink(missing_ok=True)
        return held

    def fit(self) -> int:
        """Set this thread's torch threads for the next unit of work: the reservation plus the node's free cores."""
        threads = self.own if self.dir is None else self.own + max(0, self.cores - self.busy())
        if self.cpu:
            set_threads(threads)
        self.fitted.append(threads)
        return threads

    @property
    def mean_threads(self) -> float:
        """Mean thread count of the units of work of the last `working` block (a metric: cores/<role>_threads)."""
        return sum(self.fitted) / len(self.fitted) if self.fitted else float(self.own)

    @contextmanager
    def working(self) -> Iterator[None]:
        """Mark this process busy for the block; each unit of work inside it calls `fit` first."""
        self.fitted = []
        if self.entry is None:
            yield
            return
        tmp = self.entry.with_name(f".{self.entry.name}")
        tmp.write_text(str(self.own))
        tmp.replace(self.entry)  # whole or absent to a reader
        try:
            yield
        finally:
            self.entry.unlink(missing_ok=True)
