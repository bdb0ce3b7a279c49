"""Bad inputs fail in build_world, before any actor starts, with a message that says what to change."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.worlds.world import build_world
from probes.probe import LinearProbe


def test_missing_model_path_fails_early(tmp_path):
    cfg = load_config(overrides={"model": {"path": str(tmp_path / "no-such-model")}, "scorer": {"probes": []},
                                 "shaping": {"kind": "none"}})
    with pytest.raises(ValueError, match="model.path .*no-such-model.* does not exist"):
        build_world(cfg)


def test_directory_without_config_is_not_a_model(tmp_path):
    cfg = load_config(overrides={"model": {"path": str(tmp_path)}, "scorer": {"probes": []}, "shaping": {"kind": "none"}})
    with pytest.raises(ValueError, match="has no config.json"):
        build_world(cfg)


def test_probe_with_wrong_hidden_size_fails_early(tiny_model_dir, tmp_path):
    LinearProbe("wide", 0, torch.zeros(128), torch.zeros(1)).save(tmp_path / "wide")
    cfg = load_config(overrides={"model": {"path": str(tiny_model_dir)}, "scorer": {"probes": [{"path": str(tmp_path / "wide")}]}})
    with pytest.raises(ValueError, match="probe 'wide' has hidden size 128 but model .* has hidden size 64"):
        build_world(cfg)


def test_world_from_a_local_model_and_dataset(tiny_model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "3+4=", "answer": "7"}\n')
    cfg = load_config(overrides={"model": {"path": str(tiny_model_dir)}, "scorer": {"probes": []},
                                 "shaping": {"kind": "none"}, "task": {"dataset": str(tmp_path / "d.jsonl"), "eval_fraction": 0},
                                 "pipeline": {"prompts_per_step": 2}})
    world = build_world(cfg)
    assert world.eval_prompts is None  # no held-out split asked for
    assert world.prompt_ids[0] == [1, 5, 14, 6, 17]  # <bos> 1 + 2 =
    table = world.prompts_for_step(step=3, num=2, seed=0)
    assert sorted(table.column("prompt_id").to_pylist()) == [0, 1]
    assert table.column("group_id").to_pylist() == [6, 7]
    assert world.prompts_for_step(3, 2, 0).equals(table)  # deterministic
