import pytest

from pipeline.analysis.cost import PRESETS, Arch, Workload, forward_flops_per_token, step_cost


def test_parameter_count_matches_a_published_architecture():
    llama3_8b = Arch("8B", 32, 4096, 14336, 128256, 32, 8, 128)
    assert llama3_8b.params == pytest.approx(8.03e9, rel=0.005)
    assert PRESETS["405b"].params == pytest.approx(405.8e9, rel=0.005)


def test_toy_preset_matches_the_built_toy_model():
    from pipeline.config import ToyConfig
    from pipeline.worlds.toy import toy_model_config

    cfg = toy_model_config(ToyConfig())
    toy = PRESETS["toy"]
    assert (toy.layers, toy.hidden, toy.ffn, toy.vocab) == (cfg.num_hidden_layers, cfg.hidden_size,
                                                           cfg.intermediate_size, cfg.vocab_size)


def test_probe_cost_with_and_without_kl():
    a = PRESETS["7b"]
    w = Workload(prompts=4, group=2, prompt_len=10, completion_len=20, probe_layers=(13,), kl=True)
    c = step_cost(a, w)
    assert c.flops["probe"] == 2 * a.hidden * 8 * 20  # dot products only: residuals come with the KL pass
    assert c.flops["learn"] == pytest.approx(3 * c.flops["reference"])
    no_kl = step_cost(a, Workload(4, 2, 10, 20, (13,), kl=False))
    assert no_kl.flops["reference"] == 0
    truncated = 8 * 30 * forward_flops_per_token(a, 15, layers=14, lm_head=False)
    assert no_kl.flops["probe"] == pytest.approx(truncated + 2 * a.hidden * 8 * 20)
    full_no_head = 8 * 30 * forward_flops_per_token(a, 15, lm_head=False)
    assert truncated / full_no_head == pytest.approx(14 / 28)
    assert 0 < c.overhead() < 1e-6 < no_kl.overhead() < 0.5
