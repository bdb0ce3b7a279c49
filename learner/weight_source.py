"""The learner's weights as vLLM's `WeightSource`: one decoder layer group at a time, gathered only while read
(`learner/gather.py`), in vLLM's own grouping so that every trainer rank and receiver agree on it. Nothing is
copied until a bucket takes its bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from learner.gather import iter_groups


class PolicySource(WeightSource):
    def __init__(self, module: torch.nn.Module, zero_stage: int) -> None:
        self.module = module
        self.zero3 = zero_stage == 3
        self.max_gathered_bytes = 0  # most parameter bytes gathered at once, over this source's life

    def metadata(self) -> list[ParamMeta]:
        # A ZeRO-3 parameter's own shape is its (empty) local slice; ds_shape is the whole parameter's.
        return [ParamMeta(name, p.dtype, tuple(p.ds_shape) if self.zero3 else tuple(p.shape))
                for name, p in self.module.named_parameters()]

    @property
    def model_bytes(self) -> int:
        return sum(m.dtype.itemsize * torch.Size(m.shape).numel() for m in self.metadata())

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """(names, whole tensors) per layer group; the tensors are valid until the next group is requested."""
        for names, group in iter_groups(self.module, self.zero3, self.groups()):
            if self.zero3:
                self.max_gathered_bytes = max(self.max_gathered_bytes, sum(p.numel() * p.element_size() for p in group))
            yield names, [p.data for p in group]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors, strict=True)
