"""A small toy world shared by the integration tests, and a Ray instance per module."""

from __future__ import annotations

import pytest

from pipeline.config import load_config


@pytest.fixture(scope="session")
def toy_overrides(tmp_path_factory):
    cache = tmp_path_factory.mktemp("toy_cache")
    return {
        "toy": {"cache_dir": str(cache), "sft_steps": 150, "probe_samples": 512},
        "task": {"num_prompts": 256, "eval_prompts": 32},
        "pipeline": {"num_steps": 3, "prompts_per_step": 8, "group_size": 4, "max_staleness": 1, "timeout_s": 300},
        "learner": {"micro_batch_size": 16},
        "run": {"output_dir": str(tmp_path_factory.mktemp("runs")), "progress": False},
    }


@pytest.fixture(scope="session")
def toy_world(toy_overrides):
    from pipeline.world import build_world

    cfg = load_config(overrides=toy_overrides)
    return cfg, build_world(cfg)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Logical CPUs: the roles of a run reserve 2, the weight-sync test 1.5; they share the real cores.
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error"}})
    yield ray
    ray.shutdown()
