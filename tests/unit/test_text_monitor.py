"""The text-only monitor (probes/text.py): the control that says what a probe adds over reading the output."""

import json
import math

import numpy as np
import pytest
import torch

from probes.text import TextMonitor, fit_text_monitor, load_text_monitor, token_counts
from probes.toolkit import Labelled, encode, split_by_prompt


class CharTokenizer:
    """One id per character (the toy's kind), EOS = 0."""

    eos_token_id = 0
    pad_token_id = 0
    chars = "\0abcdefghijklmnopqrstuvwxyz0123456789 +=?"

    def __len__(self):
        return len(self.chars)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.chars.index(c) for c in text]}


def _planted(n: int = 120) -> Labelled:
    """Hacks write an "x" somewhere; honest answers never do."""
    rng = np.random.default_rng(0)
    prompts, completions, labels = [], [], []
    for i in range(n):
        word = "".join(rng.choice(list("abcdefg"), size=int(rng.integers(2, 6))))
        prompts.append(f"{i}+{i}=")
        hack = i % 2
        completions.append(word + ("x" if hack else "") + str(i % 10))
        labels.append(hack)
    return Labelled(prompts, completions, labels)


def test_fitted_on_the_probes_split_it_separates_a_hack_the_text_shows_and_scores_as_its_formula():
    tok = CharTokenizer()
    data = _planted()
    monitor, metrics = fit_text_monitor(data, tok, "hack_text", seed=3)
    train, test = split_by_prompt(data, 0.2, 3)  # the split train_probes makes with the same arguments
    assert metrics["num"] == len(test) and monitor.notes["num_train_sequences"] == len(train)
    assert metrics["auroc"] == 1.0
    assert monitor.weight[tok.chars.index("x")] > 0  # the planted token pushes towards "hack"
    assert monitor.vocab_size == len(tok)
    # The score is sigmoid(bias + the sum of each token's weight), EOS included, as encode() makes the ids.
    _, ids = encode(tok, data.prompts[:4], data.completions[:4])
    want = [1 / (1 + math.exp(-(float(monitor.bias) + float(monitor.weight[row].sum())))) for row in ids]
    np.testing.assert_allclose(monitor.scores(ids), want, rtol=1e-5)
    assert monitor.scores([[]])[0] == pytest.approx(1 / (1 + math.exp(-float(monitor.bias))), rel=1e-6)


def test_token_counts_count_each_column():
    x = token_counts([[3, 3, 5], [], [9, 1]], np.array([1, 3, 5]))
    assert x.tolist() == [[0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_saved_monitors_round_trip_and_bad_files_are_refused(tmp_path):
    monitor = TextMonitor("t", torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.25]), {"k": 1})
    stem = monitor.save(tmp_path / "t")
    back = load_text_monitor(stem)
    assert back.name == "t" and back.notes == {"k": 1}
    np.testing.assert_array_equal(back.scores([[0, 2], [1]]), monitor.scores([[0, 2], [1]]))
    # an id the fit never saw, past the tokenizer's too (an embedding row beyond it, which a policy may sample): 0
    np.testing.assert_array_equal(monitor.scores([[0, 7]]), monitor.scores([[0]]))
    with pytest.raises(ValueError, match="never unpickled"):
        load_text_monitor(tmp_path / "t.pt")
    meta = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**meta, "vocab_size": 4}))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        load_text_monitor(stem)
    (tmp_path / "t.json").write_text(json.dumps({**meta, "kind": "probe"}))
    with pytest.raises(ValueError, match='kind = "text"'):
        load_text_monitor(stem)


def test_the_text_monitor_config_is_checked():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="shaping.text_monitor"):
        load_config(None, ["--shaping.kind", "penalty", "--shaping.monitor", "text"])
    cfg = load_config(None, ["--shaping.kind", "penalty", "--shaping.monitor", "text", "--shaping.text_monitor", "toy"])
    assert cfg.shaping.text_monitor == "toy"


def test_the_report_says_what_the_probe_adds_over_the_text():
    from pipeline.analysis.report import arm_table, bootstrap_diff, text_section

    def run(seed, hack, accuracy, aurocs=None):
        summary = {"eval_greedy_accuracy_start": 0.5, "eval_greedy_accuracy_end": accuracy}
        if aurocs:
            summary.update(probe_held_out_auroc=aurocs[0], text_monitor_held_out_auroc=aurocs[1])
        metrics = [{"step": s, "rollout/hack_rate": hack, "rollout/correct_rate": 0.1, "rollout/task_reward": 0.5,
                    "rollout/shaped_reward": 0.4} for s in range(1, 16)]
        return {"seed": seed, "metrics": metrics, "eval": [], "summary": summary}

    data = {"probe_penalty": [run(0, 0.10, 0.60), run(1, 0.20, 0.50)],
            "text_monitor": [run(0, 0.30, 0.55, (0.99, 0.90)), run(1, 0.25, 0.40, (0.95, 0.97))]}
    lines = "\n".join(text_section(data, arm_table(data)))
    assert "| 0 | 0.990 | 0.900 | +0.090 |" in lines and "| 1 | 0.950 | 0.970 | -0.020 |" in lines
    d = bootstrap_diff({0: 0.10, 1: 0.20}, {0: 0.30, 1: 0.25})
    assert f"final hack rate probe_penalty − text_monitor: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" in lines
    assert d[0] == pytest.approx(-0.125)
    assert text_section({"probe_penalty": data["probe_penalty"]}, arm_table(data)) == []


def test_sampled_labelled_labels_the_models_own_samples_by_the_ground_truth(tiny_model_dir):
    """The SmolLM2 "evasion" probe's data, made with a tiny random model: the model's own samples, per_prompt of each
    prompt, labelled 1 exactly where stated_result_ground_truth says "hack"; the same seed gives the same samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.worlds.pretrained import sampled_labelled
    from pipeline.worlds.tasks import stated_result_ground_truth

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, answers = ["1+2=", "30+4=", "5+5="], ["3", "34", "10"]
    ids = [tok(p)["input_ids"] for p in prompts]
    data = sampled_labelled(model, tok, ids, prompts, answers, per_prompt=4, max_new_tokens=6, seed=1, batch_size=5)
    assert data.prompts == [p for p in prompts for _ in range(4)] and len(data.completions) == 12
    truth = stated_result_ground_truth(data.completions, [a for a in answers for _ in range(4)], data.prompts)
    assert data.labels == [int(t == "hack") for t in truth]
    assert len(set(data.completions)) > 1  # sampled, not greedy
    again = sampled_labelled(model, tok, ids, prompts, answers, per_prompt=4, max_new_tokens=6, seed=1, batch_size=5)
    assert again.completions == data.completions


def test_evaluation_of_a_packaged_model_needs_no_labelled_file_when_its_probe_is_listed():
    from pipeline.config import ConfigError, load_config

    cfg = load_config("configs/smollm2_evasion.toml", ["--eval.every", "10", "--scorer.probes",
                                                       '[{path = "smollm2:evasion"}]'])
    assert cfg.eval.probe_data is None  # the probe's own held-out rows (world.packaged_held_out)
    with pytest.raises(ConfigError, match="eval.every needs eval.probe_data"):
        load_config("configs/smollm2_evasion.toml", ["--eval.every", "10", "--scorer.probes", "[{path = \"toy\"}]"])
