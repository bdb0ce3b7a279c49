"""pipeline.cores: roles' threads follow the phase (pipeline.cores = "phase"), and the thread count changes no result."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.cores import CoreShare, node_cores, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_role_gets_the_cores_no_other_busy_role_reserves(tmp_path, restore_threads):
    """Four cores, the ledger shared by three roles (other processes stand in for the learner and the generator):
    alone, a role takes every core; beside busy ones, its own reservation plus what they leave; a busy process
    killed from outside frees its cores; "reserved" keeps the reservation whatever happens."""
    share = CoreShare(1, "job1", phase=True, cores=4, root=tmp_path)
    ledger = share.dir
    with share.working():
        threads = share.fit()
        assert threads == 4 and torch.get_num_threads() == 4
        assert sorted(p.name for p in ledger.iterdir()) == [str(share.entry.name)]
        others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
        try:
            (ledger / str(others[0].pid)).write_text("2")  # a learner of 2 CPUs, busy
            assert share.fit() == 2 and torch.get_num_threads() == 2  # 1 own + (4 - 1 - 2) free
            (ledger / str(others[1].pid)).write_text("1")  # and a generator of 1
            assert share.fit() == 1  # never below its own reservation
            others[0].kill()
            stat = Path(f"/proc/{others[0].pid}/stat")
            deadline = time.monotonic() + 10
            while stat.read_text().rpartition(")")[2].split()[0] != "Z" and time.monotonic() < deadline:
                time.sleep(0.01)  # the signal lands asynchronously
            assert share.fit() == 3  # killed, not yet reaped (a zombie): its entry no longer counts, and is removed
            others[0].wait()
            assert not (ledger / str(others[0].pid)).exists()
        finally:
            for p in others:
                p.kill()
                p.wait()
    assert not share.entry.exists()  # idle: nothing held
    other = CoreShare(2, "job1", phase=True, cores=4, root=tmp_path)
    with other.working():
        threads = other.fit()
        assert threads == 4  # the killed generator's entry is not counted either
    fixed = CoreShare(1.5, "job1", phase=False, cores=4, root=tmp_path)
    with fixed.working():
        threads = fixed.fit()
        assert threads == 2 and not fixed.phase and fixed.entry is None


def test_outside_ray_a_role_keeps_its_reservation(monkeypatch, restore_threads):
    monkeypatch.setenv("PROBE_RL_CORES", "phase")
    share = CoreShare.for_role(2)
    assert not share.phase  # no Ray job to share a ledger with
    with share.working():
        threads = share.fit()
        assert threads == 2
    gpu = CoreShare.for_role(0.5, cpu=False)
    set_threads(3)
    with gpu.working():
        gpu.fit()
        assert torch.get_num_threads() == 3  # a GPU role's threads are left alone


def test_node_cores_is_the_affinity_at_most():
    import os

    assert 1 <= node_cores() <= len(os.sched_getaffinity(0))


def test_a_models_pass_and_gradients_do_not_depend_on_the_thread_count(restore_threads):
    """What makes "phase" safe to use: the same logits and gradients at 1 and 2 threads, bit for bit, on a Llama
    large enough for torch to split its matrix products over threads (hidden 256, 8 x 64 tokens;
    tests/integration/test_colocate.py checks whole runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    out = []
    for threads in (1, 2):
        set_threads(threads)
        model.zero_grad()
        logits = model(ids).logits
        torch.log_softmax(logits, -1).mean().backward()
        out.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_colocation_needs_a_synchronous_cpu_run():
    cfg = load_config(overrides={"pipeline": {"colocate": True, "max_staleness": 0}})
    assert cfg.pipeline.cores == "phase"
    with pytest.raises(ConfigError, match="max_staleness = 0"):
        load_config(overrides={"pipeline": {"colocate": True}})
    with pytest.raises(ConfigError, match="drop pipeline.cores"):
        load_config(overrides={"pipeline": {"colocate": True, "max_staleness": 0, "cores": "reserved"}})
    with pytest.raises(ConfigError, match="both the generators and the learner need GPUs"):
        load_config(overrides={"pipeline": {"colocate": True, "max_staleness": 0}, "learner": {"num_gpus": 1}})
