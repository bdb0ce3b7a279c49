"""What a local run exposes. Ray 2.60 resolves a loopback node address to the machine's own and binds its gRPC
servers to every interface, so a local run cannot be loopback-only; what keeps other hosts out is Ray's token
authentication. This test lists every port the local instance's processes listen on and checks each one that
is not loopback: it refuses a client without the token, or it is a read-only Prometheus metrics endpoint."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
REFUSED = ("refused HTTP", "refused gRPC")


def test_a_real_run_listens_on_loopback_except_rays_token_guarded_ports(reference_run):
    """The shared reference run (a real local run, its Ray instance started as `probe-rl run` starts one: two
    learner ranks with DeepSpeed's rendezvous store and gloo sockets, the collective weight transfer with its store
    and gloo sockets in the learner and in vLLM's worker, two vLLM generators, two scorers). Every socket any process
    of the run listened on, seen as it ran, is on loopback, or is one of Ray's own servers, which refuse a client
    without the token (probed as it was found), or one of its read-only metrics endpoints. probe-rl's own stores and
    sockets are seen, on loopback.

    Asserts what the bare-instance test and the real-run test each asserted: nothing that answers without the
    token; Ray's servers seen and refusing (GCS, raylet, object manager, workers, agents: five gRPC servers or more,
    and an HTTP one); at most three metrics endpoints; the learners' and generators' own sockets on loopback."""
    seen = reference_run.listening
    open_ = {k: v for k, v in seen.items() if v[1] not in ("loopback", "metrics", *REFUSED)}
    assert not open_, f"listeners that answer without Ray's token: {open_}"
    learners = [v for v in seen.values() if v[0].startswith("ray::Learner")]
    # rank 0's rendezvous store, both ranks' gloo sockets and the transfer group's store: on loopback
    assert sum(1 for _, what in learners if what == "loopback") >= 3, learners
    assert all(what in ("loopback", "refused gRPC") for _, what in learners), learners  # Ray's worker gRPC
    assert any(t.startswith("ray::Generator") and what == "loopback" for t, what in seen.values()), seen
    whats = [what for _, what in seen.values()]
    assert whats.count("refused gRPC") >= 5 and whats.count("refused HTTP") >= 1, seen  # Ray's servers, probed
    assert whats.count("metrics") <= 3, seen  # the dashboard's, the autoscaler monitor's and the dashboard agent's
