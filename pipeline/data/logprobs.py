"""Log-probs of the sampled tokens without a (batch x tokens x vocab) float32 log-softmax.

At a 150k vocabulary the logits of a 64 x 1024 batch are 10 G floats: a plain `log_softmax(logits.float())`
needs 40 GB for the float copy and as much again for its result. Both the scorer (reference log-probs) and the
learner (policy log-probs) need only the sampled token's log-prob at each position, so:

- `selective_log_softmax(logits, targets)` reads given logits a chunk of positions at a time (float32 only per
  chunk); its backward recomputes the softmax per chunk instead of keeping one.
- `model_logprobs(model, ids, mask)` never forms the whole logits at all: it runs the model with no positions
  kept for the head (`logits_to_keep` = an empty index), takes the decoder's last hidden state, and applies the
  output head a chunk of positions at a time. Under autograd each chunk is checkpointed, so the backward pass
  recomputes that chunk's logits rather than keeping them. Peak memory is then set by activations (hidden
  size), not by the vocabulary. Models whose forward has no `logits_to_keep` fall back to full logits read by
  `selective_log_softmax`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager

import torch

CHUNK_TOKENS = 1024  # positions per chunk: chunk x vocab floats at a time (150k vocab: 0.6 GB in float32)


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V), (N,) -> log p(target), logsumexp; float32 only for this chunk."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return x.gather(-1, targets[:, None]).squeeze(-1) - lse, lse


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        out = torch.empty(tgt.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, flat.shape[0], chunk):
            out[s:s + chunk], lse[s:s + chunk] = _chunk_logprobs(flat[s:s + chunk], tgt[s:s + chunk])
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out.reshape(targets.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        flat, tgt, g = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], ctx.chunk):
            e = slice(s, s + ctx.chunk)
            # d/dx (x[t] - lse(x)) = onehot(t) - softmax(x)
            part = -torch.exp(flat[e].float() - lse[e, None]) * g[e, None]
            part.scatter_add_(-1, tgt[e, None], g[e, None])
            grad[e] = part.to(grad.dtype)
        return grad.reshape(logits.shape), None, None


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log_softmax(logits)[..., targets] as float32, a chunk of positions at a time: (..., V), (...) -> (...)."""
    return _SelectiveLogSoftmax.apply(logits, targets.long(), chunk)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log p(input_ids[:, t+1] | prefix) for each position: (B, T, V), (B, T) -> (B, T-1)."""
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:], chunk)


def _head_chunk(head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return _chunk_logprobs(logits, targets)[0]


@contextmanager
def _last_hidden(model: torch.nn.Module):
    """Captures the decoder's final (normed) hidden state: the input the output head would see."""
    box: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def keeps_no_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward can skip its output head (`logits_to_keep` with an index tensor)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters and model.base_model is not model


def model_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   chunk: int = CHUNK_TOKENS, forward: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | prefix): (B, T) -> (B, T-1) float32, the output head applied a chunk at a time.

    `forward` is what to call for the pass (default: the model; the learner passes its DeepSpeed engine)."""
    forward = forward or model
    if not keeps_no_logits(model):
        return token_logprobs(forward(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, chunk)
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    with _last_hidden(model) as box:
        forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none)
    hidden = box[-1][:, :-1]
    b, t, h = hidden.shape
    flat, tgt = hidden.reshape(b * t, h), input_ids[:, 1:].reshape(-1).long()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for s in range(0, flat.shape[0], chunk):
        args = (head, softcap, flat[s:s + chunk], tgt[s:s + chunk])
        if torch.is_grad_enabled() and flat.requires_grad:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(_head_chunk, *args, use_reentrant=False))
        else:
            parts.append(_head_chunk(*args))
    return torch.cat(parts).reshape(b, t) if parts else flat.new_zeros(b, t, dtype=torch.float32)
