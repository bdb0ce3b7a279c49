"""Whole parameters one decoder layer at a time, gathered only while read (no vLLM needed: checkpoints use it).

Under ZeRO-3 every rank holds a slice of each parameter; gathering a layer group is a collective that every
rank must enter in the same order. Walking `iter_groups` on every rank does exactly that, and releases each
group before gathering the next, so neither a weight sync nor a checkpoint ever holds the whole model on any
rank. At ZeRO stages 0-2 every rank already holds whole parameters: nothing is gathered or copied.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch

_LAYER = re.compile(r"\.(\d+)\.")


def layer_groups(names: list[str]) -> list[list[str]]:
    """Names in order, grouped by their first index segment (`model.layers.3.` is layer 3); names without one
    (embeddings, final norm, head) each form a group of their own."""
    groups: list[list[str]] = []
    last = None
    for name in names:
        m = _LAYER.search(name)
        key = m.group(0) if m else None
        if key is not None and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


def gathered(params: list[torch.nn.Parameter], zero3: bool) -> AbstractContextManager[None]:
    """Context in which `params` are whole on every rank (a collective under ZeRO-3; nothing otherwise)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def iter_groups(module: torch.nn.Module, zero3: bool, groups: list[list[str]] | None = None
                ) -> Iterator[tuple[list[str], list[torch.nn.Parameter]]]:
    """(names, parameters) per group, whole while the caller holds the group; `groups` defaults to layers."""
    params = dict(module.named_parameters())
    for names in groups if groups is not None else layer_groups(list(params)):
        group = [params[n] for n in names]
        with gathered(group, zero3):
            yield names, group
