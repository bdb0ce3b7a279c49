"""A small toy world shared by the integration tests, and a Ray instance per module."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import load_config


@pytest.fixture(scope="session")
def toy_overrides(tmp_path_factory):
    # One toy cache for both pytest-xdist workers (the session's folder above theirs): the world is built once
    # (about 25 s of CPU), by whichever worker gets there first, under the cache's own lock.
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy_cache"
    cache.mkdir(exist_ok=True)
    return {
        "toy": {"cache_dir": str(cache), "sft_steps": 150, "probe_samples": 512},
        "task": {"num_prompts": 256, "eval_prompts": 32},
        "pipeline": {"num_steps": 3, "prompts_per_step": 8, "group_size": 4, "max_staleness": 1, "timeout_s": 300},
        "learner": {"micro_batch_size": 16},
        "run": {"output_dir": str(tmp_path_factory.mktemp("runs")), "progress": False},
    }


@pytest.fixture(scope="session")
def toy_world(toy_overrides):
    from pipeline.worlds.world import build_world

    cfg = load_config(overrides=toy_overrides)
    return cfg, build_world(cfg)


REFERENCE_STEPS = 8


def reference_args(toy_overrides, out_dir, name: str) -> list[str]:
    """The run several tests share, in the precision a GPU run trains in: bf16 weights in the learner (DeepSpeed's
    fp32 masters beside them), the vLLM generators and the scorers; two generators, two scorers and two learner
    ranks, the default max_staleness 1 (generation a version ahead), penalty shaping with the toy probe refit
    every 3 steps on the run's own rollouts, the same probe also read inside the generators' sampling pass
    (`hack@gen`, refit with it), a checkpoint every 2 steps, TensorBoard and offline W&B logs."""
    from ._helpers import toy_args

    return toy_args(toy_overrides, out_dir, name, REFERENCE_STEPS) + [
        "--model.dtype", "bfloat16", "--generator.num_workers", "2", "--scorer.num_workers", "2",
        "--learner.num_ranks", "2", "--learner.checkpoint_every", "2", "--scorer.retrain_every", "3",
        "--run.loggers", '["tensorboard", "wandb"]',
        "--scorer.probes", '[{path = "toy"}, {path = "toy", read = "generator"}]', "--shaping.probe", "hack"]


@dataclass
class ReferenceRun:
    run_dir: Path
    listening: dict  # every socket its processes listened on: (address, port) -> (process title, what it is)


@pytest.fixture(scope="session")
def reference_run(toy_world, toy_overrides, tmp_path_factory) -> ReferenceRun:
    """One uninterrupted run in a process of its own, and the sockets its processes listened on, seen as it ran
    (test_exposure.py reads them)."""
    from ._helpers import ROOT, Listeners, what_answers

    out_dir = tmp_path_factory.mktemp("reference")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *reference_args(toy_overrides, out_dir,
                                                                                           "run")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Listeners(driver.pid, what_answers)
    watch.start()
    log, _ = driver.communicate(timeout=900)
    listening = watch.finish()
    assert driver.returncode == 0, log[-3000:]
    return ReferenceRun(out_dir / "run", listening)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Logical CPUs: the roles of a run reserve 2, the weight-sync test 1.5; they share the real cores.
    from pipeline.loop.remote import LOCAL_RAY_SYSTEM_CONFIG

    from ._helpers import environ

    # The workers inherit the raylet's environment, which is this process's: a job-level runtime_env instead
    # would start every worker through a set-up process (about 1 s and a CPU-second more per actor).
    with environ(VLLM_LOGGING_LEVEL="ERROR", TRANSFORMERS_VERBOSITY="error"):
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()

