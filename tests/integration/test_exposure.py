"""What a local run exposes. Ray 2.60 resolves a loopback node address to the machine's own and binds its gRPC
servers to every interface, so a local run cannot be loopback-only; what keeps other hosts out is Ray's token
authentication. This test lists every port the local instance's processes listen on and checks each one that
is not loopback: it refuses a client without the token, or it is a read-only Prometheus metrics endpoint."""

from __future__ import annotations

import os

import pytest

from ._helpers import grpc_codes, http_answer

pytestmark = pytest.mark.integration


def test_every_non_loopback_port_refuses_a_client_without_the_token():
    import psutil
    import ray

    from pipeline.config import load_config
    from pipeline.loop.driver import init_ray

    assert not ray.is_initialized()
    init_ray(load_config())  # the local instance exactly as `probe-rl run` starts it

    @ray.remote(num_cpus=0.1)
    class Probe:  # an actor, so that a worker process listens too
        def ping(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    host = ray.util.get_node_ip_address()
    try:
        me = psutil.Process()
        processes = {me.pid} | {p.pid for p in me.children(recursive=True)}
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in processes]
        exposed = [c for c in listening if not c.laddr.ip.startswith("127.") and c.laddr.ip != "::1"]
        refused_grpc = refused_http = metrics = 0
        for c in exposed:
            name = psutil.Process(c.pid).name()
            status, body = http_answer(host, c.laddr.port)
            if status in (401, 403):
                refused_http += 1
            elif status == 200 and body.startswith(b"# HELP"):
                metrics += 1  # Prometheus text: read-only metrics, the README names these
            elif status is None:
                codes = grpc_codes(host, c.laddr.port)
                assert "OK" not in codes, f"{name} on port {c.laddr.port} answered gRPC without the token"
                assert "UNAUTHENTICATED" in codes, f"{name} on port {c.laddr.port}: no refusal seen ({codes})"
                refused_grpc += 1
            else:
                pytest.fail(f"{name} on port {c.laddr.port} answered HTTP {status} without the token: {body[:80]!r}")
        # the test saw the servers it is about: GCS, raylet (node and object manager), workers, agents
        assert refused_grpc >= 5 and refused_http >= 1, (refused_grpc, refused_http, metrics)
        assert metrics <= 3  # the dashboard's, the autoscaler monitor's and the dashboard agent's
    finally:
        ray.shutdown()


def test_a_real_run_listens_on_loopback_except_rays_token_guarded_ports(reference_run):
    """The shared reference run (a real local run: two learner ranks with DeepSpeed's rendezvous store and gloo
    sockets, the collective weight transfer with its store and gloo sockets in the learner and in vLLM's worker,
    two vLLM generators, two scorers). Every socket any process of the run listened on, seen as it ran, is on
    loopback, or is one of Ray's own servers, which refuse a client without the token (probed as it was found),
    or one of its read-only metrics endpoints. probe-rl's own stores and sockets are seen, on loopback."""
    seen = reference_run.listening
    open_ = {k: v for k, v in seen.items() if v[1] not in ("loopback", "refused", "metrics")}
    assert not open_, f"listeners that answer without Ray's token: {open_}"
    learners = [v for v in seen.values() if v[0].startswith("ray::Learner")]
    # rank 0's rendezvous store, both ranks' gloo sockets and the transfer group's store: on loopback
    assert sum(1 for _, what in learners if what == "loopback") >= 3, learners
    assert all(what in ("loopback", "refused") for _, what in learners), learners  # Ray's worker gRPC: refused
    assert any(t.startswith("ray::Generator") and what == "loopback" for t, what in seen.values()), seen
    assert any(what == "refused" for _, what in seen.values()), seen  # Ray's servers were seen and probed
    assert sum(1 for _, what in seen.values() if what == "metrics") <= 3
