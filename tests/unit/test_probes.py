import json
import math

import pytest
import torch

from probes.fit import auroc, fit_logistic
from probes.probe import LinearProbe, aggregate, load_probe


def test_aggregate_mean_max_last_on_ragged_masks():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.5, 0.2, 0.8, 0.4], [0.6, 0.6, 0.6, 0.6]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    mean = aggregate(scores, mask, "mean")
    assert torch.allclose(mean[:2], torch.tensor([0.6, 0.475]))
    assert torch.allclose(aggregate(scores, mask, "max")[:2], torch.tensor([0.9, 0.8]))
    assert torch.allclose(aggregate(scores, mask, "last")[:2], torch.tensor([0.3, 0.4]))
    for how in ("mean", "max", "last"):
        assert math.isnan(aggregate(scores, mask, how)[2].item())  # nothing to score: NaN, never 0


def test_token_scores_are_sigmoid_of_affine_map():
    torch.manual_seed(0)
    probe = LinearProbe("p", 0, torch.randn(8), torch.tensor([0.3]))
    h = torch.randn(2, 3, 8)
    expected = 1 / (1 + torch.exp(-(torch.einsum("bth,h->bt", h, probe.weight) + 0.3)))
    assert torch.allclose(probe.token_scores(h), expected, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    probe = LinearProbe("hack", 3, torch.arange(6.0), torch.tensor([-1.5]), "max", notes={"auroc": 0.9})
    probe.save(tmp_path / "p")
    loaded = load_probe(tmp_path / "p.json")
    assert (loaded.name, loaded.layer, loaded.aggregation, loaded.notes) == ("hack", 3, "max", {"auroc": 0.9})
    assert torch.equal(loaded.weight, probe.weight) and torch.equal(loaded.bias, probe.bias)


def test_hidden_size_and_layer_mismatch_name_both_numbers():
    probe = LinearProbe("p", 5, torch.zeros(32), torch.zeros(1))
    with pytest.raises(ValueError, match="hidden size 32 but the model has hidden size 64"):
        probe.check_fits(num_layers=8, hidden_size=64)
    with pytest.raises(ValueError, match="reads layer 5 but the model has 4 layers"):
        probe.check_fits(num_layers=4, hidden_size=32)


def test_corrupt_probe_files_are_refused(tmp_path):
    LinearProbe("p", 0, torch.zeros(4), torch.zeros(1)).save(tmp_path / "p")
    (tmp_path / "p.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_probe(tmp_path / "p")
    LinearProbe("p", 0, torch.zeros(4), torch.zeros(1)).save(tmp_path / "q")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_probe(tmp_path / "q")
    (tmp_path / "q.json").write_text(json.dumps({"name": "q", "layer": "two", "hidden_size": 4, "aggregation": "mean"}))
    with pytest.raises(ValueError, match="'layer' must be an int"):
        load_probe(tmp_path / "q")
    (tmp_path / "q.json").write_text(json.dumps({"name": "q", "layer": 0}))  # every missing key named, not the first
    with pytest.raises(ValueError, match=r"'hidden_size' must be an int \(missing\); 'aggregation' must be a str "
                                         r"\(missing\)"):
        load_probe(tmp_path / "q")
    (tmp_path / "q.json").write_text(json.dumps({"name": "q", "layer": 0, "hidden_size": 5, "aggregation": "mean"}))
    with pytest.raises(ValueError, match="weight has 4 entries but its metadata says hidden_size 5"):
        load_probe(tmp_path / "q")
    with pytest.raises(ValueError, match="does not exist"):
        load_probe(tmp_path / "missing")


def test_pickle_is_never_loaded(tmp_path):
    import pickle

    (tmp_path / "p.json").write_text(json.dumps({"name": "p", "layer": 0, "hidden_size": 4, "aggregation": "mean"}))
    (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"weight": torch.zeros(4)}))
    with pytest.raises(ValueError, match="safetensors"):
        load_probe(tmp_path / "p")
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"weight": torch.zeros(4)}))  # a torch.save'd probe
    with pytest.raises(ValueError, match=r"pickled.pt: probes are never unpickled .* save it as safetensors"):
        load_probe(tmp_path / "pickled.pt")


def test_auroc_hand_computed_cases():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([1, 1, 0])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 0, 1])) == 0.0
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_logistic_fit_recovers_a_planted_direction():
    torch.manual_seed(0)
    direction = torch.randn(16)
    direction /= direction.norm()
    x = torch.randn(4000, 16) * 2 + 5  # offset and scale: standardisation must be folded back correctly
    logits = 3 * ((x - 5) @ direction)
    y = (torch.rand(4000) < torch.sigmoid(logits)).float()
    fit = fit_logistic(x, y, l2=1e-4)
    cos = torch.dot(fit.weight, direction) / fit.weight.norm()
    assert cos > 0.95
    # raw-space weights must reproduce the generating logits up to fitting noise
    pred = x @ fit.weight + fit.bias
    assert torch.corrcoef(torch.stack([pred, logits]))[0, 1] > 0.97
    assert auroc(pred, y) > 0.85


def test_logistic_fit_refuses_single_class():
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(torch.randn(10, 3), torch.zeros(10))


def test_window_aggregation_is_max_of_rolling_means():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.8, 0.2, 0.0], [0.4, 0.6, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    # row 0 tokens 0.1 0.9 0.8 0.2: windows of 2 -> 0.5, 0.85, 0.5; row 1 has 2 tokens -> its mean for K=3
    assert torch.allclose(aggregate(scores, mask, "window:2"), torch.tensor([0.85, 0.5]))
    assert torch.allclose(aggregate(scores, mask, "window:3"), torch.tensor([(0.9 + 0.8 + 0.2) / 3, 0.5]))
    assert torch.allclose(aggregate(scores, mask, "window:1"), aggregate(scores, mask, "max"))
    with pytest.raises(ValueError, match="window:K"):
        aggregate(scores, mask, "window:0")


def test_recall_at_fixed_fpr_hand_computed():
    from probes.toolkit import recall_at_fpr

    neg = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
    pos = torch.tensor([0.995, 0.985, 0.975, 0.5, 0.955])
    scores, labels = torch.cat([neg, pos]), torch.cat([torch.zeros(100), torch.ones(5)])
    # 1% FPR: one negative (0.99) may exceed the threshold 0.98 -> positives above 0.98: 0.995, 0.985
    assert recall_at_fpr(scores, labels, 0.01) == pytest.approx(2 / 5)
    # 5% FPR: threshold 0.94 -> 0.995, 0.985, 0.975, 0.955
    assert recall_at_fpr(scores, labels, 0.05) == pytest.approx(4 / 5)
    assert recall_at_fpr(scores, labels, 0.0) == pytest.approx(1 / 5)


def test_split_by_prompt_keeps_prompts_together():
    from probes.toolkit import Labelled, split_by_prompt

    data = Labelled([f"p{i % 10}" for i in range(40)], ["c"] * 40, [i % 2 for i in range(40)])
    train, test = split_by_prompt(data, 0.3, seed=1)
    assert sorted(train + test) == list(range(40))
    assert not {data.prompts[i] for i in train} & {data.prompts[i] for i in test}
    assert len({data.prompts[i] for i in test}) == 3


def test_train_probes_reads_a_planted_concept(tiny_model_dir):
    """Completions with a distinctive token are separable at every layer; both-class metrics land in notes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.toolkit import Labelled, evaluate_probes, train_probes

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [f"{i}+{i}=" for i in range(60)]
    data = Labelled(prompts * 2, [str(2 * i) for i in range(60)] + [f"{2 * i} {2 * i + 1}" for i in range(60)],
                    [0] * 60 + [1] * 60)
    results = train_probes(model, tok, data, [0, 1], "spaced", "max")
    assert [p.name for p, _ in results] == ["spaced_l0", "spaced_l1"]
    for probe, metrics in results:
        assert metrics["auroc"] > 0.95 and probe.notes["held_out"] == metrics and probe.aggregation == "max"
    again = evaluate_probes(model, tok, data, [p for p, _ in results])
    assert all(m["num"] == 120 and m["num_positive"] == 60 for m in again)


def test_probes_is_a_library_that_imports_nothing_above_it():
    """probes/ is the bottom floor: no module of it imports pipeline, actors or learner (not even lazily)."""
    import ast
    from pathlib import Path

    above = {"pipeline", "actors", "learner"}
    for path in Path(__file__).resolve().parents[2].joinpath("probes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in above for n in names), f"{path.name} imports {names}"


def test_aggregate_ragged_equals_aggregate_on_the_padded_rows():
    from probes.probe import aggregate, aggregate_ragged

    rows = [[0.1, 0.9, 0.3], [0.5], []]
    padded = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    for how in ("mean", "max", "last", "window:2"):
        got, want = aggregate_ragged(rows, how), aggregate(padded, mask, how).tolist()
        assert got[:2] == pytest.approx(want[:2]) and math.isnan(got[2]) and math.isnan(want[2])
