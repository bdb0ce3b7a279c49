"""Weights on the wire: a state dict as numpy arrays, so Ray's object store moves it without copies.

Ray serialises numpy arrays out of band (zero-copy reads from shared memory) but pickles torch
tensors byte by byte; `bench_weight_sync.py` measures the difference. bfloat16 has no numpy dtype,
so it travels as int16 bits with its dtype named alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WireWeights:
    version: int
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]  # name -> torch dtype name

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def to_wire(state: dict[str, torch.Tensor], version: int) -> WireWeights:
    arrays, dtypes = {}, {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        arrays[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return WireWeights(version, arrays, dtypes)


def from_wire(wire: WireWeights | dict) -> dict[str, torch.Tensor]:
    """Tensors that share memory with the arrays (read-only object-store memory: copy before writing)."""
    if isinstance(wire, dict):  # already a state dict (tests, in-process use)
        return wire
    out = {}
    for name, a in wire.arrays.items():
        t = torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(a.copy())
        out[name] = t.view(torch.bfloat16) if wire.dtypes[name] == "bfloat16" else t
    return out
