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


REWARDS = '''
def with_prompts(completions, answers, prompts, difficulty, unit="ones"):
    return [float(len(p)) + d + (0.5 if unit == "ones" else 0.0) for p, d in zip(prompts, difficulty)]

def everything(completions, answers, **columns):
    return [float(len(columns["prompts"][i]) * 100 + columns["difficulty"][i]) for i in range(len(completions))]

def needs_source(completions, answers, source):
    return [0.0] * len(completions)

def one_argument(completions):
    return [0.0] * len(completions)

def truth(completions, answers, prompts):
    return ["correct" if p.startswith("1") else "wrong" for p in prompts]
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+2=", "answer": "3", "difficulty": 1}\n'
                                      '{"prompt": "13+4=", "answer": "17", "difficulty": 2}\n')
    return tmp_path


def _world_with(tiny_model_dir, data, reward, truth=None):
    task = {"dataset": str(data / "d.jsonl"), "eval_fraction": 0, "reward_fn": f"my_rewards:{reward}",
            "ground_truth_fn": f"my_rewards:{truth}" if truth else None}
    return build_world(load_config(overrides={"model": {"path": str(tiny_model_dir)}, "scorer": {"probes": []},
                                              "shaping": {"kind": "none"}, "task": task,
                                              "pipeline": {"prompts_per_step": 2}}))


def test_a_reward_function_receives_the_prompts_and_the_datasets_columns(tiny_model_dir, reward_module):
    world = _world_with(tiny_model_dir, reward_module, "with_prompts", "truth")
    assert world.reward_args == ("prompts", "difficulty") and world.truth_args == ("prompts",)
    # rows index the prompt set, as a rollout's prompt_id does: each completion gets its own prompt's values
    assert world.reward(["a", "b", "c"], ["17", "3", "17"], [1, 0, 1]) == [5 + 2 + 0.5, 4 + 1 + 0.5, 5 + 2 + 0.5]
    assert world.truth(["a", "b"], ["3", "17"], [0, 1]) == ["correct", "correct"]
    everything = _world_with(tiny_model_dir, reward_module, "everything")
    assert everything.reward_args == ("prompts", "difficulty")  # **kwargs: every column
    assert everything.reward(["x", "y"], ["3", "17"], [0, 1]) == [401.0, 502.0]


def test_a_reward_function_asking_for_what_the_data_lacks_fails_at_load(tiny_model_dir, reward_module):
    with pytest.raises(ValueError, match=r"task.reward_fn: needs_source requires \['source'\], which the data does "
                                         r"not have; it can take \['prompts', 'difficulty'\]"):
        _world_with(tiny_model_dir, reward_module, "needs_source")
    with pytest.raises(ValueError, match=r"must take \(completions, answers\) first"):
        _world_with(tiny_model_dir, reward_module, "one_argument")


def test_the_two_argument_reward_still_works(tiny_model_dir, reward_module):
    from pipeline.worlds.tasks import arithmetic_reward

    plain = build_world(load_config(overrides={"model": {"path": str(tiny_model_dir)}, "scorer": {"probes": []},
                                               "shaping": {"kind": "none"}, "task": {"dataset": str(reward_module / "d.jsonl"),
                                                                                     "eval_fraction": 0},
                                               "pipeline": {"prompts_per_step": 2}}))
    assert plain.reward_fn is arithmetic_reward and plain.reward_args == ()
    assert plain.reward(["3", "18"], ["3", "17"], [0, 1]) == [1.0, 0.0]
