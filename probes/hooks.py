"""Scoped forward hooks on named decoder layers.

Torch hooks are global state on a module, so they live only inside `capture_residuals` and
`edit_residual`, which remove them in `finally`. Activations are detached inside the hook unless the
caller differentiates through them (a probe term in the learner's loss). With `stop_after`, the hook
on that layer ends the forward pass early (raising a private exception the context manager
swallows), which is how a scorer with no KL term skips the layers above its deepest probe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a transformers causal LM (Llama, Qwen, Mistral, GPT-2, GPT-NeoX...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; supported: Llama-style models")


class Capture:
    """What a capture holds after the forward pass: layer index -> residual stream (B, T, H)."""

    def __init__(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}
        self.stopped_early = False


@contextmanager
def capture_residuals(model: nn.Module, layers: list[int], stop_after: int | None = None,
                      detach: bool = True) -> Iterator[Capture]:
    """Record the output of decoder blocks `layers` (0-based) for forward passes run inside the block; with
    `detach=False` the recorded tensors stay in the autograd graph."""
    blocks = decoder_layers(model)
    for i in layers:
        if not 0 <= i < len(blocks):
            raise ValueError(f"layer {i} does not exist: the model has {len(blocks)} decoder layers (0..{len(blocks) - 1})")
    cap = Capture()
    handles = []

    def make_hook(i: int):
        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            cap.residuals[i] = hidden.detach() if detach else hidden
            if stop_after == i:
                cap.stopped_early = True
                raise _StopForward

        return hook

    hooked = sorted(set(layers) | ({stop_after} if stop_after is not None else set()))
    try:
        for i in hooked:
            handles.append(blocks[i].register_forward_hook(make_hook(i)))
        try:
            yield cap
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_residual(model: nn.Module, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output (residual stream, (B, T, H)) of decoder block `layer` by `edit(output)` for forward passes
    run inside the block; gradients flow through the edit."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} does not exist: the model has {len(blocks)} decoder layers (0..{len(blocks) - 1})")

    def hook(_mod: nn.Module, _inp: object, out: object):
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
