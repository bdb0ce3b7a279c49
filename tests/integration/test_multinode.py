"""Several nodes on one machine (Ray's own `ray.cluster_utils.Cluster`: a raylet, resources and object store
per node): learner ranks on different nodes (rendezvous at rank 0's node), roles pinned to nodes by custom
resources, scorers that scale by backlog (one that cannot be placed yet joining once a node offers room), and
whole nodes removed mid-run. (That two ranks reach one rank's weights at ZeRO-2 and ZeRO-3: test_weights.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config

from ._helpers import environ, same_rows, same_weights, steps_done

pytestmark = [pytest.mark.integration, pytest.mark.multinode]
SLOW_SWITCH = "probe-rl-multinode-slow"  # scorers sleep 1 s per call while a file of this name exists in tmp


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (the driver, no work) and six worker nodes: one for generators, two for scorers, three for
    learner ranks (one more than the ranks, for a lost node's bundle to move to)."""
    import ray
    from ray.cluster_utils import Cluster

    switch = tmp_path_factory.mktemp("switch") / SLOW_SWITCH
    from pipeline.loop.remote import LOCAL_RAY_SYSTEM_CONFIG

    # Every node, also one added mid-test, starts from this process's environment, and its workers from the
    # node's (a job-level runtime_env would start every worker through a set-up process of its own).
    with environ(PROBE_RL_SLOW=f"scorer:1.0:{switch}", VLLM_LOGGING_LEVEL="ERROR", TRANSFORMERS_VERBOSITY="error"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": LOCAL_RAY_SYSTEM_CONFIG})
        nodes = {"gen": cluster.add_node(num_cpus=1, resources={"gen": 1})}
        for name in ("score_a", "score_b"):
            nodes[name] = cluster.add_node(num_cpus=1, resources={"score": 1})
        for name in ("learn_a", "learn_b", "learn_c"):
            nodes[name] = cluster.add_node(num_cpus=1, resources={"learn": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster, nodes, switch
    ray.shutdown()
    cluster.shutdown()


def actors_of(cls: str) -> list:
    """(state API) the live actors of a class, each with the node it runs on."""
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", cls), ("state", "=", "ALIVE")], limit=1000)


def node_of(cluster, node_id: str):
    return next(n for n in cluster.list_all_nodes() if n.node_id == node_id)


class Background(threading.Thread):
    """A run on a thread of its own, so that the test's main thread can change the cluster meanwhile (Ray starts
    a node only from the main thread)."""

    def __init__(self, cfg, world, log=lambda *_: None, resume: Path | None = None) -> None:
        """`resume`: the run folder of a run to carry on (`probe-rl run --resume`), from its newest checkpoint."""
        super().__init__(daemon=True)
        self.cfg, self.world, self.log, self.resume, self.error = cfg, world, log, resume, None

    def run(self) -> None:
        from pipeline.loop.driver import run
        from pipeline.loop.run_dir import latest_checkpoint, make_run_dir

        try:
            if self.resume is None:
                run(self.cfg, make_run_dir(self.cfg), self.world, log=self.log)
            else:
                run(self.cfg, self.resume, self.world, log=self.log, resume_from=latest_checkpoint(self.resume))
        except BaseException as e:  # handed to the test, which raises it
            self.error = e

    def finish(self, timeout: float = 900) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the run did not finish"
        if self.error is not None:
            raise self.error


def wait_for(condition, timeout: float = 600, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rows_of(metrics) -> list[dict]:
    try:
        return pq.read_table(metrics).to_pylist()
    except (OSError, ValueError):
        return []


def cluster_overrides(toy_overrides, tmp_path, name, steps, **extra) -> dict:
    o = {**toy_overrides, "run": {**toy_overrides["run"], "output_dir": str(tmp_path), "name": name},
         "pipeline": {**toy_overrides["pipeline"], "num_steps": steps},
         "generator": {"num_cpus": 1, "resources": {"gen": 1}},
         "scorer": {"num_cpus": 0.5, "resources": {"score": 1}, "placement": "SPREAD"},
         "learner": {**toy_overrides["learner"], "num_ranks": 2, "num_cpus": 0.5, "resources": {"learn": 1},
                     "placement": "STRICT_SPREAD", "zero_stage": 3, "checkpoint_every": 2}}
    for section, values in extra.items():
        o[section] = {**o.get(section, {}), **values}
    return o


def test_scorers_grow_under_backlog_wait_for_room_join_when_a_node_offers_it_and_shrink_when_idle(
        toy_world, toy_overrides, cluster, tmp_path):
    """Scorer scaling by backlog, on a cluster with room for two scorers. Scoring is made slow (1 s a call), so
    scorers grow one at a time from scorer.num_workers = 1 towards scorer.max_workers = 3; the run goes on while a
    starting scorer joins (steps finish meanwhile) and while the third waits to be placed; once a node with room
    joins the cluster, so does the third scorer (not before). Then scoring turns fast again and the scorers
    retire one at a time, each draining first, back to 1. Every step has all its rollouts. Then the run is
    stopped with a STOP file in its folder (each phase takes as many steps as the machine needs): it stops
    between steps, with a checkpoint of the last step and the rollouts already launched beside it, and no
    summary.json (it did not finish). Resumed (`--resume`), it trains the next step on those rollouts (not on
    new ones from the newer weights), appends its rows, and stops again at the next STOP.

    Asserts what the local scaling test and the placement test each asserted: the growth 1 -> 2 -> 3 one at a
    time, steps finishing while a scorer was joining, the log lines of a start, a join and a retirement, the
    third scorer joining only after the node was added, the shrink back to the minimum, every step whole."""
    from pipeline.loop.checkpoints import read_inflight

    c, nodes, switch = cluster
    _, world = toy_world
    steps = 500  # more than any machine needs: the test stops the run
    cfg = load_config(overrides=cluster_overrides(
        toy_overrides, tmp_path, "scaling", steps,
        scorer={"num_workers": 1, "max_workers": 3, "scale_up_wait": 0.1, "scale_down_steps": 2},
        learner={"num_ranks": 1, "zero_stage": 0, "placement": "PACK", "checkpoint_every": 0}))
    run_dir = tmp_path / "scaling"
    metrics = run_dir / "metrics.parquet"
    log: list[str] = []
    switch.touch()
    try:
        run = Background(cfg, world, log.append)
        run.start()

        def third_waited_three_steps():
            return len([r for r in rows_of(metrics) if r["scorer/workers"] == 2 and r["scorer/joining"] == 1]) >= 3

        wait_for(lambda: third_waited_three_steps() or not run.is_alive(), what="the third scorer to wait for room")
        assert run.is_alive(), "the run ended before the third scorer waited for room"
        added_at = len(rows_of(metrics))
        nodes["score_c"] = c.add_node(num_cpus=1, resources={"score": 1})
        wait_for(lambda: any(r["scorer/workers"] == 3 for r in rows_of(metrics)) or not run.is_alive(),
                 what="the third scorer to join")
    finally:
        switch.unlink()  # scoring is fast again

    def back_to_one():
        workers = [r["scorer/workers"] for r in rows_of(metrics)]
        return 3 in workers and workers[-1] == 1

    wait_for(lambda: back_to_one() or not run.is_alive(), what="the scorers to shrink back to 1")
    (run_dir / "STOP").touch()
    run.finish()
    rows = rows_of(metrics)
    workers = [int(r["scorer/workers"]) for r in rows]
    assert [r["rollout/rows"] for r in rows] == [32] * len(rows) and len(rows) < steps  # every step whole
    peak = workers.index(3)
    assert workers[0] == 1 and workers[:peak] == sorted(workers[:peak]) and 2 in workers[:peak], workers  # one by one
    assert peak >= added_at  # the third joined once there was room, not before
    assert any(r["scorer/joining"] == 1.0 for r in rows[:peak])  # steps finished while a scorer was starting
    assert min(workers[peak:]) == 1, workers  # back to the minimum once scoring was fast
    assert any("starting scorer 1" in m for m in log) and any("scorer 2 joined" in m for m in log), log
    assert any("retiring scorer 2 once it drains" in m for m in log), log
    # Stopped: the last step trained is checkpointed with the next step's rollouts, already launched.
    assert any(f"stopping after step {len(rows)}" in m for m in log), log[-5:]
    assert not (run_dir / "STOP").exists() and not (run_dir / "summary.json").exists()
    inflight = read_inflight(run_dir / "checkpoints" / f"step_{len(rows):06d}")
    assert [(step, table.num_rows) for step, table, _, _ in inflight] == [(len(rows) + 1, 32)]

    # Resumed: the next step is trained on the rollouts launched before the stop, then a second STOP ends it.
    stopped = len(rows)
    log.clear()
    again = Background(cfg, world, log.append, resume=run_dir)
    again.start()
    wait_for(lambda: steps_done(metrics) > stopped or not again.is_alive(), what="a step after the resume")
    (run_dir / "STOP").touch()
    again.finish()
    rows = rows_of(metrics)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > stopped  # appended, once each
    assert [r["rollout/rows"] for r in rows] == [32] * len(rows)
    assert any(f"stopping after step {len(rows)}" in m for m in log), log[-5:]
    sampled = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    resumed_step = [x for x in sampled if x["step"] == stopped + 1]
    [(_, launched, _, _)] = inflight
    assert resumed_step
    assert {x["policy_version"] for x in resumed_step} == set(launched.column("policy_version").to_pylist())
    launched_completions = {tuple(c) for c in launched.column("completion_ids").to_pylist()}
    assert {tuple(x["completion_ids"]) for x in resumed_step} <= launched_completions


def test_nodes_lost_mid_run_leave_a_run_equal_to_an_uninterrupted_one(toy_world, toy_overrides, cluster, tmp_path):
    """bf16 (learner, generators, scorers), the default max_staleness 1, ZeRO-3, two learner ranks on two nodes:
    the node holding the scorer is removed at step 2 (its rollouts in flight are lost with its object store and
    redone by a replacement on another node), a node holding a learner rank at step 4 (every rank restarts from
    the last checkpoint, fp32 master weights and moments gathered from both ranks' partitions, the lost rank's
    bundle moves to the spare node). Every step has all its rollouts, none twice, and the run equals an
    uninterrupted one on the same cluster, step for step and in its final weights and optimizer state."""
    from ray.util.state import list_actors

    c, nodes, _ = cluster
    _, world = toy_world
    bf16 = {"model": {"dtype": "bfloat16"}}
    ref = Background(load_config(overrides=cluster_overrides(toy_overrides, tmp_path, "reference", 6, **bf16)), world)
    ref.start()
    wait_for(lambda: steps_done(tmp_path / "reference" / "metrics.parquet") >= 1, what="the first step")
    layout = {cls: [a.node_id for a in actors_of(cls)] for cls in ("Generator", "Scorer", "Learner")}
    ref.finish()
    want = rows_of(tmp_path / "reference" / "metrics.parquet")
    # generators, scorers and the two learner ranks each on nodes of their own
    assert len(layout["Learner"]) == 2 and len(set(layout["Learner"])) == 2
    used = layout["Generator"] + layout["Scorer"] + layout["Learner"]
    assert len(set(used)) == len(used) == 4

    log: list[str] = []
    metrics = tmp_path / "faults" / "metrics.parquet"
    run = Background(load_config(overrides=cluster_overrides(toy_overrides, tmp_path, "faults", 6, **bf16)), world,
                     log.append)
    run.start()
    removed = []
    for at, cls in ((2, "Scorer"), (4, "Learner")):
        wait_for(lambda at=at: steps_done(metrics) >= at or not run.is_alive(), what=f"step {at}")
        [target, *_] = list_actors(filters=[("class_name", "=", cls), ("state", "=", "ALIVE")])
        c.remove_node(node_of(c, target.node_id))
        removed.append((cls, steps_done(metrics)))
    run.finish()
    got = rows_of(metrics)
    assert [cls for cls, _ in removed] == ["Scorer", "Learner"] and all(at < 6 for _, at in removed)
    assert [r["rollout/rows"] for r in got] == [32] * 6
    same_rows(got, want)
    assert any("scorer 0 is down" in m for m in log) and any("learner restarted from" in m for m in log)
    final = "checkpoints/step_000006"
    same_weights(tmp_path / "faults" / final, tmp_path / "reference" / final)
