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
    with pytest.raises(ValueError, match="'layer' must be a int"):
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
