"""Fault injection for tests: make one worker process die once, at a chosen call.

`PROBE_RL_KILL_ONCE="scorer:3:/tmp/marker"` makes the first scorer process that reaches its 3rd
`score` call exit hard (as a crashed or preempted node would), after creating the marker file so
that its replacement, and every other process, carries on. Several specs are separated by commas.
Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
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
