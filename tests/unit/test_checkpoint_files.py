"""Checkpoint folders are read as JSON + safetensors only, and malformed ones are refused clearly."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from learner.checkpoint import CheckpointReader, ShardWriter
from pipeline.driver import latest_checkpoint


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
