"""The ways a probe acts on training, on a tiny model: the loss term's gradient, ablation's geometry, the
evasion rate, held-out sets that share nothing, and start-up refusals."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data.batching import pack
from probes.hooks import capture_residuals, edit_residual
from probes.probe import LinearProbe, probe_loss, project_out, unit_direction


def _batch():
    return pack([[1, 5, 14, 6, 17], [1, 9, 17], [1, 4, 4, 17]], [[7, 8, 2], [8, 2], [9, 9, 9, 2]])


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_probe_loss_gradient_equals_autograd_of_the_formula(tiny_model_dir, aggregation):
    """coef * sum over rows of aggregate_t sigmoid(h_t . w + b), h the residual after layer 0 at completion tokens;
    the hook-based term the learner adds must have exactly this gradient in every parameter."""
    torch.manual_seed(0)
    probe = LinearProbe("hack", 0, torch.randn(64), torch.tensor([0.1]), aggregation)
    batch = _batch()
    rows = torch.tensor([True, False, True])  # the middle row is screened: it contributes nothing

    def grads(fn):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        fn(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def by_hooks(model):
        with capture_residuals(model, [0], detach=False) as cap:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return 0.7 * probe_loss(probe, cap.residuals[0], batch.completion_mask, rows)

    def by_hand(model):
        h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  output_hidden_states=True).hidden_states[1]  # (B, T, H) after decoder layer 0
        s = torch.sigmoid(h @ probe.weight + probe.bias)
        total = 0.0
        for i in range(3):
            if rows[i]:
                tok = s[i][batch.completion_mask[i]]
                total = total + (tok.mean() if aggregation == "mean" else tok.max())
        return 0.7 * total

    got, want = grads(by_hooks), grads(by_hand)
    assert set(got) == set(want) and any(g.abs().max() > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ablation_removes_the_direction_and_nothing_else_in_the_learner(tiny_model_dir):
    torch.manual_seed(1)
    u = unit_direction(torch.randn(64))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = _batch()
    with torch.no_grad(), capture_residuals(model, [0]) as plain:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad(), edit_residual(model, 0, lambda h: project_out(h, u)), capture_residuals(model, [0]) as cut:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    before, after = plain.residuals[0], cut.residuals[0]
    along = (before @ u).abs().max()
    assert along > 0.1 * before.abs().max()  # there was something to remove
    assert (after @ u).abs().max() < 1e-4 * along  # orthogonal to u
    basis = torch.linalg.qr(torch.cat([u[:, None], torch.randn(64, 63)], 1))[0][:, 1:]  # u's orthogonal complement
    torch.testing.assert_close(after @ basis, before @ basis, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)


def test_ablation_in_vllms_residual_form_removes_the_direction_of_the_sum():
    """vLLM's decoder blocks hand on (hidden, residual) whose sum is the residual stream; the worker's hook takes
    the projection off the residual part."""
    from pipeline.transport.vllm_worker import ablated_residual

    torch.manual_seed(2)
    u = unit_direction(torch.randn(32))
    hidden, residual = torch.randn(7, 32), torch.randn(7, 32)
    stream = hidden + ablated_residual(hidden, residual, u)
    assert (stream @ u).abs().max() < 1e-5
    torch.testing.assert_close(stream, project_out(hidden + residual, u), rtol=1e-6, atol=1e-6)


def test_evasion_rate_counts_hacks_the_probe_misses():
    from pipeline.data.shaping import evasion_rate

    truth = np.array(["hack", "hack", "correct", "hack", "wrong", "hack"])
    score = np.array([0.9, 0.2, 0.1, 0.4, 0.95, np.nan], dtype=np.float32)
    assert evasion_rate(score, truth, 0.5) == pytest.approx(2 / 3)  # 0.2 and 0.4 miss; the NaN one is not counted
    assert evasion_rate(score, truth, 0.3) == pytest.approx(1 / 3)
    assert np.isnan(evasion_rate(score, np.array(["correct"] * 6), 0.5))


def test_held_out_sets_share_nothing():
    from pipeline.config import load_config
    from pipeline.worlds.tasks import PARTS, part_pairs
    from pipeline.worlds.toy import toy_labelled
    from pipeline.worlds.world import prompt_sets

    parts = {name: set(part_pairs(49, name)) for name, _ in PARTS}
    assert sum(len(p) for p in parts.values()) == 50 * 50  # every sum in exactly one part
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not parts[a] & parts[b], (a, b)
    cfg = load_config(overrides=["--task.num_prompts", "2000", "--task.eval_prompts", "100"])
    rl, held = prompt_sets(cfg)
    assert not set(rl.prompts) & set(held.prompts)
    sft = {f"{a}+{b}=" for a, b in parts["sft"]}
    assert not set(held.prompts) & sft and not set(rl.prompts) & sft
    probe_train = set(toy_labelled(200, 49, seed=4).prompts)
    probe_eval = set(toy_labelled(200, 49, seed=999, part="probe_eval").prompts)
    assert not probe_train & probe_eval and not (probe_train | probe_eval) & set(rl.prompts)


def test_user_datasets_get_a_held_out_split(tmp_path):
    from pipeline.config import load_config
    from pipeline.worlds.world import prompt_sets

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(400)))
    cfg = load_config(overrides={"task": {"dataset": str(data), "eval_fraction": 0.1}})
    train, held = prompt_sets(cfg)
    assert len(train) + len(held) == 400 and 20 <= len(held) <= 60 and not set(train.prompts) & set(held.prompts)
    assert prompt_sets(cfg)[1].prompts == held.prompts  # the same split every time
    other = tmp_path / "e.jsonl"
    other.write_text(json.dumps({"prompt": "q3", "answer": "3"}) + "\n")
    bad = load_config(overrides={"task": {"dataset": str(data), "eval_dataset": str(other)}})
    with pytest.raises(ValueError, match="task.eval_dataset shares 1 prompts with task.dataset"):
        prompt_sets(bad)


def test_shaping_probes_the_learner_cannot_use_are_refused_naming_them():
    from transformers import LlamaConfig, RwkvConfig

    from pipeline.worlds.world import check_shaping_probe

    llama = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    zero = LinearProbe("blank", 1, torch.zeros(64), torch.zeros(1))
    with pytest.raises(ValueError, match="probe 'blank' has a zero weight"):
        check_shaping_probe("ablate", zero, llama)
    check_shaping_probe("loss", zero, llama)  # a zero weight is a (useless) loss term, but hookable
    with pytest.raises(ValueError, match="probe 'late' reads layer 5, but the learner's model has decoder layers 0..1"):
        check_shaping_probe("loss", LinearProbe("late", 5, torch.ones(64), torch.zeros(1)), llama)
    rwkv = RwkvConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                      intermediate_size=128, context_length=32)
    with pytest.raises(ValueError, match="shaping.kind = 'loss' needs probe 'hack' on a layer the learner can hook"):
        check_shaping_probe("loss", LinearProbe("hack", 0, torch.ones(64), torch.zeros(1)), rwkv)


def test_datasets_smaller_than_a_step_are_refused_at_load(tmp_path):
    from pipeline.config import load_config
    from pipeline.worlds.world import prompt_sets

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(40)))
    with pytest.raises(ValueError, match="holds 40 prompts, fewer than the pipeline.prompts_per_step=64"):
        prompt_sets(load_config(overrides={"task": {"dataset": str(data)}, "pipeline": {"prompts_per_step": 64}}))
    ok = load_config(overrides={"task": {"dataset": str(data), "eval_fraction": 0.0},
                                "pipeline": {"prompts_per_step": 40}})
    assert len(prompt_sets(ok)[0]) == 40
    split = load_config(overrides={"task": {"dataset": str(data), "eval_fraction": 0.2},
                                   "pipeline": {"prompts_per_step": 38}})
    with pytest.raises(ValueError, match="to train on, fewer than pipeline.prompts_per_step=38"):
        prompt_sets(split)
    with pytest.raises(ValueError, match="task.num_prompts=10 is fewer than"):
        prompt_sets(load_config(overrides={"task": {"num_prompts": 10}, "pipeline": {"prompts_per_step": 16}}))


def test_an_experiment_resumes_from_a_committed_reports_data_without_running_it_again(tmp_path):
    """A run held in --out's data/ (what a committed report carries to a fresh clone) counts as finished: nothing is
    started for it (no Ray), and the report is rewritten from it."""
    from pipeline.analysis.experiment import run_experiment
    from pipeline.analysis.report import export_data, load_exported
    from pipeline.config import load_config

    metrics = [{"step": s, "rollout/hack_rate": 0.1 * s, "rollout/correct_rate": 0.2, "rollout/task_reward": 0.5,
                "rollout/shaped_reward": 0.5, "rollout/evasion_rate": 0.0} for s in range(1, 16)]
    summary = {"steps": 15, "eval_greedy_accuracy_start": 0.5, "eval_greedy_accuracy_end": 0.25}
    export_data(tmp_path, {"plain": [{"seed": 0, "metrics": metrics, "eval": [], "summary": summary}]})
    lines = []
    root = run_experiment("configs/experiment.toml", {("plain", 0): load_config(None)}, str(tmp_path), log=lines.append)
    assert "[1/1] plain seed 0: finished before, kept" in lines
    assert not (tmp_path / "plain-seed0").exists()  # nothing ran
    back = load_exported(root)["plain"]
    assert back[0]["metrics"] == metrics and back[0]["summary"]["eval_greedy_accuracy_end"] == 0.25
    assert "| plain | 1 |" in (root / "report.md").read_text()
