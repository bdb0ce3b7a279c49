"""Shared fixtures: a tiny random Llama (unit tests) and a small built toy world (integration tests)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Integration modules by how long they take on 2 cores, longest first (seconds, roughly): the two test processes
# (`-n 2`, pyproject.toml) take them in this order, each module whole (its Ray instance, fixtures and engines
# are shared by its tests), and the unit tests fill in around them. test_pipeline.py and test_recovery.py share
# the reference run, so they go to one process together.
MODULE_ORDER = {"test_pipeline": 1, "test_recovery": 1, "test_liveness": 2, "test_weights": 3, "test_multinode": 4,
                "test_exposure": 5, "test_cluster": 6, "test_in_flight": 7, "test_generator_probes": 8}
GROUPS = {"test_recovery": "test_pipeline"}


def pytest_collection_modifyitems(config, items):
    """Tiers: every integration test but the smoke run is `slow` (`pytest -m "not slow"`: the unit tests and one
    end-to-end run with every real role, the check before a commit). GPU tests are skipped without a CUDA device.
    Parallel test processes (pytest-xdist, `--dist loadgroup`): each integration module is one group, run whole by
    one process, longest first."""
    import torch

    for item in items:
        if "integration" in item.keywords and "smoke" not in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "integration" in item.keywords:
            module = item.module.__name__.rsplit(".", 1)[-1]
            item.add_marker(pytest.mark.xdist_group(GROUPS.get(module, module)))
    order = {id(item): (MODULE_ORDER.get(item.module.__name__.rsplit(".", 1)[-1], 99), i)
             for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 64) with the toy tokenizer, saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.worlds.toy import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
