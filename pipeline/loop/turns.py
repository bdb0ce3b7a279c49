"""Colocated roles taking turns (pipeline.colocate): the order of one step's hand-overs between the generators
and the learner, and what each costs.

A step of a colocated run: the generators sample and the scorers score (the learner's optimizer state is in
host memory), the generators go to sleep, the learner brings its optimizer state back and trains, moves it out
again, the generators wake their weights, the new version is copied into them, they wake their KV cache. On GPUs
generator i and learner rank i share one GPU, so each phase has the memory the other frees: vLLM's sleep at
generator.sleep_level (1: weights to host memory, KV cache freed; 2: both freed), DeepSpeed's `offload_states`
(learner.offload_states), weights handed over in place through CUDA IPC (weights.backend "ipc"). On CPUs sleep is
level 0 (vLLM pauses its scheduler and frees nothing) and the cores follow the phase (pipeline/cores.py).

`plan` is the whole order as data (unit-tested against what vLLM requires of it); `Turns` runs it on a fleet.
A generator or learner that dies during a hand-over is replaced as anywhere else in the loop; a replacement
starts awake, which the next hand-over takes into account (sleeping or waking an engine twice is harmless).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (role, method, args): "generators" and "learners" are every actor of the role, "weights" the fleet's push
Call = tuple[str, str, tuple]


def plan(level: int, offload: bool) -> tuple[list[Call], list[Call]]:
    """What runs before the learner's step, and after it, for generators sleeping at `level` and a learner that
    does (`offload`) or does not move its optimizer state while they generate."""
    before: list[Call] = [("generators", "sleep", ())]
    after: list[Call] = []
    if offload:
        before.append(("learners", "reload_states", ()))
        after.append(("learners", "offload_states", ()))
    if level:
        # Level 1 and 2 free the weights' memory: wake it first, copy the new version into it, then the KV
        # cache (vLLM resumes scheduling once every tag is awake). Waking the KV cache after the update also
        # leaves no cached prefix of the old weights.
        after += [("generators", "wake_up", (["weights"],)), ("weights", "push", ()),
                  ("generators", "wake_up", (["kv_cache"],))]
    else:
        after += [("weights", "push", ()), ("generators", "wake_up", (None,))]
    return before, after


@dataclass
class Turns:
    """Runs `plan` on a fleet around each learner step; `seconds` keeps what the last step's hand-overs took
    (the slowest actor of each), for the metrics (colocate/*_s)."""

    level: int | None  # None: not colocated, the learner's step runs between nothing
    offload: bool = False
    asleep: bool = False  # the generators gave the devices away and have not all taken them back
    learner_resident: bool = True  # the learner's optimizer state is on its device (at start, after a restart)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Any) -> Turns:
        return cls(cfg.sleep_level(), cfg.offloads_states())

    def before_learn(self, fleet: Any) -> None:
        if self.level is None:
            return
        self.seconds = {}
        before, _ = plan(self.level, self.offload)
        self._run(fleet, before, push=lambda: None)

    def after_learn(self, fleet: Any, push: Callable[[], None]) -> None:
        """The learner's step is done: `push` sends its weights (in the plan's place for them)."""
        if self.level is None:
            push()
            return
        _, after = plan(self.level, self.offload)
        self._run(fleet, after, push)

    def ready_to_generate(self, fleet: Any) -> None:
        """Before generation: every engine awake and the learner's optimizer state out of the way, also after a
        recovery left the order half-way (a learner restarted from a checkpoint, a hand-over that failed)."""
        if self.level is None:
            return
        if self.offload and self.learner_resident:
            self._run(fleet, [("learners", "offload_states", ())], push=lambda: None)
        if self.asleep:
            self._run(fleet, [("generators", "wake_up", (None,))], push=lambda: None)

    def around_restart(self, fleet: Any, restart: Callable[[], None]) -> None:
        """A learner restarted from a checkpoint (`restart`) sends that checkpoint's weights to every engine: the
        engines wake first, as after the plan's own steps (at level 1 or 2 an engine asleep holds no weights to
        copy into), and the new ranks hold their optimizer state on their devices."""
        if self.level is not None and self.asleep:
            self._run(fleet, [("generators", "wake_up", (None,))], push=lambda: None)
        restart()
        self.learner_resident = True

    def _run(self, fleet: Any, calls: list[Call], push: Callable[[], None]) -> None:
        for role, method, args in calls:
            if role == "weights":
                push()
                continue
            taken = fleet.call_each(role, method, *args)
            key = {"sleep": "sleep_s", "wake_up": "wake_s", "offload_states": "offload_s",
                   "reload_states": "reload_s"}[method]
            self.seconds[key] = self.seconds.get(key, 0.0) + max(taken, default=0.0)
            if method == "sleep":
                self.asleep = True
            elif method == "wake_up" and args[0] != ["weights"]:
                self.asleep = False
            elif method == "offload_states":
                self.learner_resident = False
            elif method == "reload_states":
                self.learner_resident = True

    def metrics(self) -> dict[str, float]:
        return {f"colocate/{k}": v for k, v in self.seconds.items()}
