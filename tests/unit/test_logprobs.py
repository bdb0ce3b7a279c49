"""Chunked log-probs of the sampled tokens equal the full log-softmax, in value and in gradient."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.logprobs import model_logprobs, selective_log_softmax, token_logprobs


def reference(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_selective_log_softmax_value_and_gradient_equal_full_log_softmax(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 6, dtype=torch.float64)
    out = token_logprobs(logits, ids, chunk)
    assert out.dtype == torch.float32 and out.shape == (3, 6)
    assert torch.allclose(out, reference(logits, ids).float(), atol=1e-6)
    (g,) = torch.autograd.grad((out.double() * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((reference(logits, ids) * weights).sum(), logits)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_selective_log_softmax_keeps_the_logits_dtype_for_the_gradient():
    logits = torch.randn(2, 5, 11).bfloat16().requires_grad_()
    ids = torch.randint(0, 11, (2, 5))
    (g,) = torch.autograd.grad(selective_log_softmax(logits, ids).sum(), logits)
    assert g.dtype == torch.bfloat16


def tiny_llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_model_logprobs_equal_full_logits_and_train_the_same(tie):
    model = tiny_llama(tie_word_embeddings=tie)
    ids = torch.randint(3, 97, (3, 9))
    attn = torch.ones_like(ids)
    attn[2, 6:] = 0
    full = reference(model(input_ids=ids, attention_mask=attn).logits, ids)
    for chunk in (1, 5, 1000):
        assert torch.allclose(model_logprobs(model, ids, attn, chunk=chunk), full, atol=1e-5)
    # gradients through the checkpointed head chunks equal those of the plain loss
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(reference(model(input_ids=ids, attention_mask=attn).logits, ids).sum(), params)
    g = torch.autograd.grad(model_logprobs(model, ids, attn, chunk=4).sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_model_logprobs_never_forms_the_whole_logits():
    model = tiny_llama()
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        model_logprobs(model, ids, torch.ones_like(ids), chunk=4)
    handle.remove()
    # the model's own head call sees no positions; the chunks see at most 4 of the 2 x 8 predicted positions
    assert shapes[0] == (2, 0, 97) and all(s == (4, 97) for s in shapes[1:]) and len(shapes) == 5
