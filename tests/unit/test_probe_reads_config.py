"""Where probes are read (scorer.probes[].read, scorer.model = "generator"): the names each reading gets, the
twin that pairs a generator reading with the scorers', and the settings refused early with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from probes.probe import LinearProbe

ROOT = Path(__file__).resolve().parents[2]


def _setup(tmp_path):
    from transformers import LlamaConfig

    stem = str(LinearProbe("hack", 1, torch.ones(64), torch.zeros(1)).save(tmp_path / "hack"))
    other = str(LinearProbe("other", 0, torch.ones(64), torch.zeros(1)).save(tmp_path / "other"))
    llama = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    return stem, other, llama


def _load(overrides):
    from pipeline.worlds.world import load_probes

    model = overrides.pop("_model")
    return load_probes(load_config(overrides=overrides), None, model)


def test_a_probe_read_in_both_places_gets_a_gen_twin(tmp_path):
    stem, other, llama = _setup(tmp_path)
    paths, names, gen = _load({"_model": llama, "scorer": {"probes": [{"path": stem}, {"path": stem, "read": "generator"},
                                                                     {"path": other, "read": "generator"}]},
                               "shaping": {"kind": "penalty", "probe": "hack@gen"}})
    assert names == ["hack"] and paths == [(stem, None)]
    assert [(g.name, g.layer, g.twin) for g in gen] == [("hack@gen", 1, "hack"), ("other", 0, None)]


def test_scorer_model_generator_reads_every_probe_there_under_its_own_name(tmp_path):
    stem, _, llama = _setup(tmp_path)
    paths, names, gen = _load({"_model": llama, "scorer": {"model": "generator", "probes": [{"path": stem}]},
                               "shaping": {"kind": "penalty"}})
    assert (paths, names) == ([], []) and [(g.name, g.twin) for g in gen] == [("hack", None)]
    # ... unless a probe entry says otherwise
    _, names, gen = _load({"_model": llama, "scorer": {"model": "generator", "probes": [{"path": stem, "read": "scorer"}]}})
    assert names == ["hack"] and gen == []


def test_readings_that_cannot_work_are_refused_naming_the_fix(tmp_path):
    stem, _, llama = _setup(tmp_path)
    truth = {"ground_truth_fn": "pipeline.worlds.tasks:arithmetic_ground_truth"}
    with pytest.raises(ValueError, match='with read = "scorer"'):  # a refit needs a scorer's activations
        _load({"_model": llama, "task": truth, "scorer": {"model": "generator", "retrain_every": 2,
                                                          "probes": [{"path": stem}]}, "shaping": {"kind": "penalty"}})
    with pytest.raises(ValueError, match="ablate"):  # the generators' stream is edited there
        _load({"_model": llama, "scorer": {"probes": [{"path": stem}, {"path": stem, "read": "generator"}]},
               "shaping": {"kind": "ablate", "probe": "hack"}})
    with pytest.raises(ValueError, match="read on the generators twice"):
        _load({"_model": llama, "scorer": {"probes": [{"path": stem, "read": "generator"},
                                                      {"path": stem, "read": "generator"}]},
               "shaping": {"kind": "none", "probe": "hack"}})
    with pytest.raises(ConfigError, match="cannot chunk the prefill of a seeded request"):
        load_config(overrides={"generator": {"max_num_batched_tokens": 16}})


def test_every_shipped_experiment_file_loads():
    from pipeline.analysis.experiment import load_experiment

    for path in sorted((ROOT / "configs").glob("experiment*.toml")):
        exp, runs = load_experiment(path, None, None, [])
        assert runs, path


def test_truth_monitor_flips_its_share_of_labels_the_same_way_every_time():
    import numpy as np

    from pipeline.loop.rewarder import truth_monitor

    truth = np.array(["hack", "correct", "wrong"] * 2000)
    groups = np.repeat(np.arange(1500), 4)
    assert (truth_monitor(truth, 1.0, 0, groups) == (truth == "hack")).all()
    seventy = truth_monitor(truth, 0.7, 0, groups)
    wrong = (seventy != (truth == "hack")).mean()
    assert 0.27 < wrong < 0.33  # 30% of labels flipped
    assert (truth_monitor(truth, 0.7, 0, groups) == seventy).all()  # the same samples on a rerun
    assert (truth_monitor(truth, 0.7, 1, groups) != seventy).any()  # another seed, other samples


def test_random_direction_control_matches_the_probe_but_its_direction(tmp_path):
    from pipeline.worlds.world import random_direction_probe
    from probes.probe import load_probe

    probe = LinearProbe("hack", 1, torch.arange(64.0) / 10, torch.tensor([0.3]), aggregation="max")
    a = load_probe(random_direction_probe(probe, 0, tmp_path))
    again = load_probe(random_direction_probe(probe, 0, tmp_path))
    other = load_probe(random_direction_probe(probe, 1, tmp_path))
    assert (a.name, a.layer, a.aggregation, float(a.bias)) == ("hack_random", 1, "max", pytest.approx(0.3))
    assert float(a.weight.norm()) == pytest.approx(float(probe.weight.norm()), rel=1e-5)
    assert torch.equal(a.weight, again.weight) and not torch.equal(a.weight, other.weight)
    cos = float(a.weight @ probe.weight / (a.weight.norm() * probe.weight.norm()))
    assert abs(cos) < 0.5  # a random direction in 64 dimensions is nearly orthogonal to the probe's


def test_monitor_controls_are_wired_and_refused_where_they_cannot_work(tmp_path):
    stem, _, llama = _setup(tmp_path)
    paths, names, _ = _load({"_model": llama, "toy": {"cache_dir": str(tmp_path)}, "scorer": {"probes": [{"path": stem}]},
                             "shaping": {"kind": "penalty", "monitor": "random_direction"}})
    assert names == ["hack", "hack_random"] and paths[1][0].startswith(str(tmp_path / "random_probes"))
    with pytest.raises(ConfigError, match="in-reward kinds only"):
        load_config(overrides={"scorer": {"probes": [{"path": "toy"}]}, "shaping": {"kind": "loss", "monitor": "truth"}})
    with pytest.raises(ConfigError, match="needs task.ground_truth_fn"):
        load_config(overrides={"task": {"ground_truth_fn": None}, "shaping": {"kind": "penalty", "monitor": "truth"}})
    ok = load_config(overrides={"task": {"ground_truth_fn": "pipeline.worlds.tasks:arithmetic_ground_truth"},
                                "scorer": {"probes": []}, "eval": {"every": 0},
                                "shaping": {"kind": "penalty", "monitor": "truth", "truth_accuracy": 0.9}})
    assert ok.shaping.truth_accuracy == 0.9 and not ok.scorer.probes  # a truth monitor needs no probe
