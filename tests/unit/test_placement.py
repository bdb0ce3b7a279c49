"""Resource checks name the role that does not fit (a real local Ray instance, 2 logical CPUs, no GPU)."""

import pytest
import ray

from pipeline.loop.remote import Resources, check_fits, reserve


@pytest.fixture(scope="module")
def small_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_roles_that_fit_pass_and_the_first_that_does_not_is_named(small_ray):
    check_fits([("generator", 1, Resources(1.0)), ("scorer", 2, Resources(0.25)), ("learner", 1, Resources(0.5))])
    with pytest.raises(ValueError, match=r"learner: 2 x 1 GPU brings the run to 2 GPU, but the Ray cluster has 0 GPU in all"):
        check_fits([("generator", 1, Resources(1.0)), ("learner", 2, Resources(0.25, num_gpus=1))])
    with pytest.raises(ValueError, match=r"scorer: 3 x 0.5 CPU brings the run to 2.5 CPU, but the Ray cluster has 2 CPU in all"):
        check_fits([("generator", 1, Resources(1.0)), ("scorer", 3, Resources(0.5))])


def test_reserve_places_bundles_or_names_the_role(small_ray):
    placement = reserve("scorer", 2, Resources(0.5), timeout_s=30)
    assert placement.count == 2
    with pytest.raises(ValueError, match=r"generator: could not place 2 x \{'CPU': 1.0\}"):
        reserve("generator", 2, Resources(1.0), timeout_s=3)  # only 1 CPU is left
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(placement.group)


def test_a_local_run_asks_ray_for_a_new_instance_and_a_cluster_run_for_its_address(monkeypatch):
    """run.ray_address unset (and no RAY_ADDRESS): `init_ray` asks Ray for a new local instance (address "local"),
    so a cluster that `ray start` or Ray's test Cluster left registered in /tmp/ray is never joined by accident;
    set, it connects to that address."""
    from pipeline.config import load_config
    from pipeline.loop.remote import init_ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(load_config())
    init_ray(load_config(overrides=["--run.ray_address", "10.0.0.5:6379"]))
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 1
    assert calls[1]["address"] == "10.0.0.5:6379"
