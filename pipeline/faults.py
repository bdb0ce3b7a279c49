"""Fault injection for tests: make one worker process die once, at a chosen call, or a learner step fail.

`PROBE_RL_KILL_ONCE="scorer:3:/tmp/marker"` makes the first scorer process that reaches its 3rd
`score` call exit hard (as a crashed or preempted node would), after creating the marker file so
that its replacement, and every other process, carries on. Several specs are separated by commas.
`PROBE_RL_FAIL_AT_STEP=3` makes the learner raise when it is asked for step 3.
`PROBE_RL_SLOW="scorer:1.5:/tmp/switch"` makes every scorer call take 1.5 s longer while /tmp/switch exists
(a slow scorer made fast again by deleting the file); roles "generator" (each generate call), "decode_step"
(each of vLLM's decoding steps in a generator) and "receiver" (each weight bucket a receiver loads) too; several
specs are separated by commas. These only stretch time,
so that a test can fault a process from outside at a chosen moment.
Unset, each costs one dict lookup.
"""

from __future__ import annotations

import os
import time
from collections import Counter

_calls: Counter[str] = Counter()


def maybe_die(role: str) -> None:
    specs = os.environ.get("PROBE_RL_KILL_ONCE")
    if not specs:
        return
    _calls[role] += 1
    for spec in specs.split(","):
        target, call, marker = spec.split(":", 2)
        if target != role or _calls[role] != int(call):
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only one process ever wins
        except FileExistsError:
            continue
        os.close(fd)
        os._exit(1)


def maybe_slow_down(role: str) -> None:
    specs = os.environ.get("PROBE_RL_SLOW")
    if not specs:
        return
    for spec in specs.split(","):
        target, seconds, switch = spec.split(":", 2)
        if target == role and os.path.exists(switch):
            time.sleep(float(seconds))


def maybe_fail_step(step: int) -> None:
    """Raise in the learner when `PROBE_RL_FAIL_AT_STEP` names this step."""
    if os.environ.get("PROBE_RL_FAIL_AT_STEP") == str(step):
        raise RuntimeError(f"injected learner failure at step {step} (PROBE_RL_FAIL_AT_STEP)")
