"""Liveness at real durations: a worker busy with a long call is never taken for dead; a frozen (SIGSTOP) or killed
(SIGKILL) one is replaced, during start-up too; a weight receiver's fault is charged to the receiver, within the
transfer's bounds, never to the learner. Faults come from outside the processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from ._helpers import (
    ROOT,
    TIMEOUT,
    Killer,
    environ,
    hf_greedy,
    ray_worker_pids,
    runs_as,
    titled_pids,
    toy_args,
    train_batch,
)

pytestmark = pytest.mark.integration


def test_slow_generators_are_left_alone_and_frozen_or_killed_workers_are_replaced(toy_world, toy_overrides, tmp_path):
    """One generator with tensor parallelism 2 on CPU (vLLM runs two worker processes under it), whose every
    generate call takes 5 s longer than it would (as minutes-long generations do at real lengths), more than
    twice the health bound of 2 s, until the last fault is sent (the run's last steps then go at CPU speed). From outside: the scorer is SIGKILLed during start-up, its replacement
    SIGKILLed at step 1 while the generator is generating, the generator's tensor-parallel rank 1 process
    SIGKILLed at step 2, and the (replaced) scorer SIGSTOPped at step 4. The busy generator is never taken for
    dead; each dead or frozen worker is replaced (the generator whose TP rank died exits with its engine and is
    replaced whole), and the run completes with every step once. (A frozen generator: the receiver test below,
    through the fleet, and `test_weights.py`'s tensor-parallel test, whose frozen generator's vLLM processes
    are ended by `Fleet.stop`.)"""
    switch = tmp_path / "slow"
    switch.touch()
    steps = 6
    args = toy_args(toy_overrides, tmp_path, "live", steps) + [
        "--generator.tensor_parallel_size", "2", "--pipeline.health_timeout_s", "2", "--pipeline.timeout_s", "120"]
    env = {**os.environ, "PROBE_RL_SLOW": f"generator:5:{switch}"}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    killer = Killer(tmp_path / "live" / "metrics.parquet",
                    [(0, "Scorer"), (1, "Scorer"), (2, lambda: titled_pids("VLLM::Worker_TP1", driver.pid)),
                     (4, "Scorer", signal.SIGSTOP)], driver.pid, then=switch.unlink)
    killer.start()
    log, _ = driver.communicate(timeout=900)
    killer.join(timeout=5)
    assert driver.returncode == 0, log[-4000:]
    assert len(killer.killed) == 4, killer.report() + '\n' + log[-3000:]
    assert [k[2] for k in killer.killed][0] == 0 and all(at <= k[2] < steps for at, k in
                                                          zip((1, 2, 4), killer.killed[1:], strict=True))
    assert re.search(r"scorer 0 died during start-up \(.*\); starting a replacement", log), log[-4000:]
    assert re.search(r"scorer 0 is down; starting a replacement", log), log[-4000:]
    assert "a vLLM worker process of this generator died; exiting" in log, log[-4000:]
    replaced = re.findall(r"generator 0 (?:is down|did not finish a call)", log)
    assert len(replaced) == 1, log[-4000:]  # after its TP rank died: never for being busy
    assert len(re.findall(r"scorer 0 is down; starting a replacement", log)) == 2, log[-4000:]  # killed, frozen
    assert "of a stopped generator are still running" not in log  # the replacement waited for vLLM's processes
    stopped_pid = killer.killed[3][1]
    assert not runs_as(stopped_pid, "ray::Scorer")  # it was stopped for good, not left frozen
    rows = pq.read_table(tmp_path / "live" / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["rollout/rows"] for r in rows] == [32] * steps  # every step whole, nothing twice
    sampled = pq.read_table(tmp_path / "live" / "rollouts.parquet").column("step").to_pylist()
    assert sorted(set(sampled)) == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def slow_ray(tmp_path_factory):
    """A Ray instance whose workers stretch each weight bucket they load by 0.3 s while a switch file exists (so
    a receiver can be SIGKILLed between buckets from outside); the switch starts off."""
    import ray

    from pipeline.loop.remote import LOCAL_RAY_SYSTEM_CONFIG

    switch = tmp_path_factory.mktemp("slow") / "buckets"
    with environ(PROBE_RL_SLOW=f"receiver:0.3:{switch}"):  # inherited by every worker Ray starts
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield switch
    ray.shutdown()


def test_a_frozen_or_killed_receiver_is_replaced_by_the_fleet_and_the_learner_keeps_running(toy_world, toy_overrides,
                                                                                              slow_ray, tmp_path):
    """Through the fleet (`Fleet.push_weights`, the loop's own call): a generator SIGSTOPped after its transfer
    group assembled, then another SIGKILLed between two buckets of a send. Each sync fails within the transfer's
    bounds (weights.timeout_s 10 s, health pings every 3 s), the error names the receiver and the weights version,
    the fleet replaces that receiver and resends; the learner rank is the same process throughout (a frozen
    receiver used to hold the learner for the whole call timeout, and be charged to it). Afterwards
    both generators hold the learner's weights: their greedy completions equal transformers' on a checkpoint of
    the learner."""
    from pipeline.config import load_config
    from pipeline.loop.fleet import Fleet
    from pipeline.loop.remote import wait

    _, world = toy_world
    overrides = {**toy_overrides, "generator": {"num_workers": 2, "max_new_tokens": 8},
                 "weights": {"timeout_s": 10.0, "bucket_mb": 0.05}, "eval": {"every": 0},
                 "pipeline": {**toy_overrides["pipeline"], "health_timeout_s": 3.0, "timeout_s": 120.0}}
    cfg = load_config(overrides=overrides)
    logs: list[tuple[float, str]] = []
    fleet = Fleet.start(cfg, world, log=lambda m: logs.append((time.monotonic(), m)))
    try:
        learner = fleet.learners[0]
        learner_pid = wait(learner.pid.remote(), "learner", TIMEOUT)
        rows = cfg.pipeline.prompts_per_step * cfg.pipeline.group_size

        def step(seed: int) -> int:
            [stats] = fleet.train(train_batch(world.model_path, rows, seed))
            return stats.version

        fleet.push_weights(step(0))  # the group assembles: version 1 reaches both generators

        # A receiver frozen after its group assembled.
        frozen = wait(fleet.generators[0].pid.remote(), "generator", TIMEOUT)
        os.kill(frozen, signal.SIGSTOP)
        version = step(1)
        start = time.monotonic()
        fleet.push_weights(version)
        failure = next((t, m) for t, m in logs if m.startswith(f"weights version {version}: "))
        assert "generator 0" in failure[1] and f"weights version {version}" in failure[1], failure
        assert failure[0] - start < cfg.weights.timeout_s + 2 * cfg.pipeline.health_timeout_s + 10, failure
        assert any(m.startswith("generator 0 is down; starting a replacement") for _, m in logs)
        assert frozen not in ray_worker_pids("Generator")

        # A receiver killed between buckets (each bucket it loads takes 0.3 s more; about 27 buckets).
        version = step(2)
        victim = wait(fleet.generators[1].pid.remote(), "generator", TIMEOUT)
        slow_ray.touch()
        timer = threading.Timer(3.0, os.kill, (victim, signal.SIGKILL))
        timer.start()
        start = time.monotonic()
        try:
            fleet.push_weights(version)
        finally:
            timer.join()
            slow_ray.unlink()
        failure = next((t, m) for t, m in logs if m.startswith(f"weights version {version}: "))
        assert "bucket" in failure[1] or "generator 1" in failure[1], failure  # cut mid-transfer, named
        assert failure[0] - start < cfg.weights.timeout_s + 2 * cfg.pipeline.health_timeout_s + 10, failure
        assert any(m.startswith("generator 1 is down; starting a replacement") for _, m in logs)

        assert fleet.learners[0] is learner and wait(learner.pid.remote(), "learner", TIMEOUT) == learner_pid
        assert fleet.version == version
        assert wait([g.ready.remote() for g in fleet.generators], "generators", TIMEOUT) == [version, version]
        checkpoint = fleet.checkpoint(tmp_path)
        prompts = world.eval_prompt_ids[:6]
        want = hf_greedy(checkpoint, prompts)
        for g in fleet.generators:
            assert wait(g.greedy.remote(prompts, 8), "generator", TIMEOUT) == want
    finally:
        fleet.shutdown()
