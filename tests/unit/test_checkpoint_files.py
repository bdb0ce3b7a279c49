"""Checkpoint folders are read as JSON + safetensors only, and malformed ones are refused clearly; a STOP file
stops a run between steps once."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from learner.checkpoint import CheckpointReader, ShardWriter
from pipeline.loop.run_dir import latest_checkpoint


def _ckpt(folder, version=4):
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    (folder / "optimizer").mkdir()
    save_file({"exp_avg/w": torch.zeros(3)}, str(folder / "optimizer" / "optimizer.safetensors"))
    (folder / "probe_rl_state.json").write_text(json.dumps({"version": version}))
    return folder


def test_read_checkpoint_round_trip(tmp_path):
    ckpt = CheckpointReader(_ckpt(tmp_path / "step_000004"))
    assert ckpt.version == 4 and ckpt.weight_names == {"w"} and torch.equal(ckpt.weight("w"), torch.ones(3))
    assert torch.equal(ckpt.moment("exp_avg", "w"), torch.zeros(3)) and ckpt.moment("exp_avg_sq", "w") is None


def test_shard_writer_splits_by_size_and_indexes_like_transformers(tmp_path):
    writer = ShardWriter(tmp_path, "model", shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each: two per shard
    live = tensors["t0"]
    for name, t in tensors.items():
        writer.add(name, t)
    live.fill_(-1.0)  # the writer copied what it was handed; later changes to the live tensor do not leak in
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors" and index["metadata"]["total_size"] == 200
    (tmp_path / "probe_rl_state.json").write_text(json.dumps({"version": 1}))
    ckpt = CheckpointReader(tmp_path)
    for i in range(5):
        assert torch.equal(ckpt.weight(f"t{i}"), torch.full((10,), float(i)))


def test_corrupt_checkpoints_are_refused(tmp_path):
    bad = _ckpt(tmp_path / "a")
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": torch.ones(3)}))  # a pickle is never loaded
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        CheckpointReader(bad)
    bad = _ckpt(tmp_path / "b")
    (bad / "probe_rl_state.json").write_text("{")
    with pytest.raises(ValueError, match="probe_rl_state.json is missing or malformed"):
        CheckpointReader(bad)
    bad = _ckpt(tmp_path / "c")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model weights"):
        CheckpointReader(bad)


def test_latest_checkpoint_skips_unfinished_saves(tmp_path):
    _ckpt(tmp_path / "checkpoints" / "step_000002")
    _ckpt(tmp_path / "checkpoints" / "step_000004")
    partial = tmp_path / "checkpoints" / "step_000006"
    partial.mkdir()  # a save cut off before its state file: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step_000004"


def test_refit_probes_and_window_round_trip_beside_a_checkpoint(tmp_path):
    """scorer.retrain_every: the probes refit so far and the refit window (rollouts and labels) are written beside
    checkpoint v and read back equal, in order; pruning the checkpoint removes them; no checkpoint, nothing."""
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.data.schema import ROLLOUT_SCHEMA
    from pipeline.loop.checkpoints import prune, read_refit, refit_paths, write_refit

    def rollouts(n, seed):
        rng = np.random.default_rng(seed)
        return pa.Table.from_pydict({"prompt_id": list(range(n)), "group_id": [seed] * n,
                                     "prompt_ids": [rng.integers(4, 20, 3).tolist() for _ in range(n)],
                                     "completion_ids": [rng.integers(4, 20, 2).tolist() for _ in range(n)],
                                     "behavior_logprobs": [[-1.5, -0.5]] * n, "policy_version": [seed] * n,
                                     "behavior_versions": [[seed, seed]] * n,
                                     "answer": ["7"] * n}, schema=ROLLOUT_SCHEMA)

    (tmp_path / "checkpoints").mkdir()
    probes = {"hack": {"weight": torch.randn(16), "bias": torch.tensor([0.25])}}
    window = [(rollouts(3, 1), np.array([0, 1, 0])), (rollouts(2, 2), np.array([1, 1]))]
    write_refit(tmp_path, 4, probes, window)
    got_probes, got_window = read_refit(tmp_path / "checkpoints" / "step_000004")
    assert set(got_probes) == {"hack"} and torch.equal(got_probes["hack"]["weight"], probes["hack"]["weight"])
    assert torch.equal(got_probes["hack"]["bias"], probes["hack"]["bias"])
    assert len(got_window) == 2
    for (t, y), (gt, gy) in zip(window, got_window, strict=True):
        assert gt.equals(t) and gt.schema.equals(ROLLOUT_SCHEMA) and gy.tolist() == y.tolist()
    assert pa.concat_tables([t for t, _ in got_window]).num_rows == 5  # the refit concatenates them
    assert read_refit(None) == ({}, [])
    for v in (6, 8):
        write_refit(tmp_path, v, {}, [])
        (tmp_path / "checkpoints" / f"step_{v:06d}").mkdir()
        (tmp_path / "checkpoints" / f"step_{v:06d}" / "probe_rl_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_000004").mkdir()
    (tmp_path / "checkpoints" / "step_000004" / "probe_rl_state.json").write_text("{}")
    prune(tmp_path, 2)
    assert not any(p.exists() for p in refit_paths(tmp_path / "checkpoints" / "step_000004"))
    assert all(p.exists() for p in refit_paths(tmp_path / "checkpoints" / "step_000008"))


def test_a_stop_file_is_seen_once_and_says_how_to_resume(tmp_path):
    from pipeline.loop.run_dir import stop_requested

    said: list[str] = []
    assert not stop_requested(tmp_path, 4, said.append) and said == []
    (tmp_path / "STOP").touch()
    assert stop_requested(tmp_path, 4, said.append)
    assert not (tmp_path / "STOP").exists()  # consumed: a resumed run does not stop at once
    assert said == [f"{tmp_path / 'STOP'} found: stopping after step 4 with a checkpoint; continue with "
                    f"`probe-rl run --resume {tmp_path}`"]
    assert not stop_requested(tmp_path, 5, said.append) and len(said) == 1
