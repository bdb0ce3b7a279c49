"""Checkpoint folders are read as JSON + safetensors only, and malformed ones are refused clearly."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from learner.learner import read_checkpoint
from pipeline.driver import latest_checkpoint


def _ckpt(folder, version=4):
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    save_file({"exp_avg/w": torch.zeros(3)}, str(folder / "optimizer.safetensors"))
    (folder / "probe_rl_state.json").write_text(json.dumps({"version": version}))
    return folder


def test_read_checkpoint_round_trip(tmp_path):
    version, weights, moments = read_checkpoint(str(_ckpt(tmp_path / "step_000004")))
    assert version == 4 and torch.equal(weights["w"], torch.ones(3)) and set(moments) == {"exp_avg/w"}


def test_corrupt_checkpoints_are_refused(tmp_path):
    bad = _ckpt(tmp_path / "a")
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": torch.ones(3)}))  # a pickle is never loaded
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        read_checkpoint(str(bad))
    bad = _ckpt(tmp_path / "b")
    (bad / "probe_rl_state.json").write_text("{")
    with pytest.raises(ValueError, match="probe_rl_state.json is missing or malformed"):
        read_checkpoint(str(bad))
    bad = _ckpt(tmp_path / "c")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model weights"):
        read_checkpoint(str(bad))


def test_latest_checkpoint_skips_unfinished_saves(tmp_path):
    _ckpt(tmp_path / "checkpoints" / "step_000002")
    _ckpt(tmp_path / "checkpoints" / "step_000004")
    partial = tmp_path / "checkpoints" / "step_000006"
    partial.mkdir()  # a save cut off before its state file: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step_000004"
