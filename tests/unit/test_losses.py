import math

import torch

from learner.losses import k3_kl, ppo_loss
from pipeline.data.logprobs import token_logprobs


def test_token_logprobs_match_manual_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            p = torch.softmax(logits[b, t], -1)[ids[b, t + 1]]
            assert math.isclose(out[b, t].item(), math.log(p.item()), rel_tol=1e-5)


def test_k3_is_zero_at_equality_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(k3_kl(a, a), torch.zeros(3))
    assert (k3_kl(a, a + torch.tensor([0.3, -0.2, 1.0])) > 0).all()


def test_ppo_loss_matches_reference_with_clipping():
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]])
    behavior = torch.tensor([[-1.2, -0.5], [-1.0, -0.1]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    parts = ppo_loss(logp, behavior, adv, mask, clip_eps=0.1)
    # token by token: ratio e^0.2=1.2214 (A=1 -> clipped 1.1), 1.0 (A=1), e^-1=0.3679 (A=-2 -> min(-0.736,-1.8)=-1.8)
    expected = -(1.1 + 1.0 + (-2.0 * 0.9)) / 3
    assert math.isclose(parts.loss.item(), expected, rel_tol=1e-5)
    assert math.isclose(parts.clip_frac.item(), 2 / 3, rel_tol=1e-6)
    assert parts.num_tokens.item() == 3


def test_ppo_gradient_is_policy_gradient_when_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    parts = ppo_loss(logp, logp.detach(), torch.tensor([0.5]), torch.ones(1, 2), clip_eps=0.2)
    parts.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25]]))


def test_kl_term_adds_to_loss_and_normaliser_is_respected():
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5]])
    mask = torch.ones(1, 2)
    base = ppo_loss(logp, logp, torch.zeros(1), mask, 0.2)
    with_kl = ppo_loss(logp, logp, torch.zeros(1), mask, 0.2, ref_logp=ref, kl_coef=0.1)
    kl = k3_kl(logp, ref).mean()
    assert math.isclose(with_kl.kl.item(), kl.item(), rel_tol=1e-6)
    assert math.isclose(with_kl.loss.item() - base.loss.item(), 0.1 * kl.item(), rel_tol=1e-5)
    halved = ppo_loss(logp, logp, torch.zeros(1), mask, 0.2, ref_logp=ref, kl_coef=0.1, num_tokens=4.0)
    assert math.isclose(halved.kl.item(), kl.item() / 2, rel_tol=1e-6)


def test_a_nan_in_a_masked_row_reaches_neither_loss_nor_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    behavior = logp.detach() + 0.05 * torch.randn(3, 4)
    ref = logp.detach() + 0.1 * torch.randn(3, 4)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False  # the row with the NaNs carries no gradient
    poisoned_ref, poisoned_behavior, poisoned_adv = ref.clone(), behavior.clone(), adv.clone()
    poisoned_ref[1, 2], poisoned_behavior[1, 0], poisoned_adv[1] = math.nan, math.inf, math.nan
    a = ppo_loss(logp, poisoned_behavior, poisoned_adv, mask, 0.2, poisoned_ref, kl_coef=0.1)
    (ga,) = torch.autograd.grad(a.loss, logp)
    keep = torch.tensor([0, 2])
    logp2 = logp.detach()[keep].requires_grad_()
    b = ppo_loss(logp2, behavior[keep], adv[keep], mask[keep], 0.2, ref[keep], kl_coef=0.1)
    (gb,) = torch.autograd.grad(b.loss, logp2)
    assert torch.isfinite(a.loss) and torch.isclose(a.loss, b.loss, rtol=1e-6)
    assert torch.allclose(ga[keep], gb) and (ga[1] == 0).all()
    assert torch.isclose(a.kl, b.kl) and a.num_tokens == b.num_tokens == 8
