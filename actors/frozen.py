"""Plain transformers copies of the policy that the scorer and the evaluator hold: loading one frozen (no
gradients, eval mode), and loading a checkpoint's weights into one in place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def role_device(num_gpus: float) -> str:
    """Where a role's plain transformers model runs: the GPU Ray gave it (CUDA_VISIBLE_DEVICES names only
    that one), else the CPU."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def load_frozen_model(model_path: str, dtype: str, device: str = "cpu") -> torch.nn.Module:
    """The model frozen for scoring passes: eval mode, no gradients, and no KV cache (`use_cache` off: a
    scoring pass reads each sequence once, and a cache it never reads would cost memory the size of the
    batch's keys and values on every pass). Sampling from it (`generate`) asks for its cache itself."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str | Path) -> int:
    """Copy a probe-rl checkpoint's weights into `model`, one tensor at a time; returns its version."""
    import torch

    from learner.checkpoint import CheckpointReader

    ckpt = CheckpointReader(checkpoint)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - ckpt.weight_names)
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights for {missing[:3]}: it belongs to another model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.weight(name).to(p.device, p.dtype))
    return ckpt.version
