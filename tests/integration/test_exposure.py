"""What a local run exposes. Ray 2.60 resolves a loopback node address to the machine's own and binds its gRPC
servers to every interface, so a local run cannot be loopback-only; what keeps other hosts out is Ray's token
authentication. This test lists every port the local instance's processes listen on and checks each one that
is not loopback: it refuses a client without the token, or it is a read-only Prometheus metrics endpoint."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration

# methods of the services Ray's processes serve; each server answers UNAUTHENTICATED for its own without a token
GRPC_METHODS = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
                "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks",
                "/ray.rpc.ReporterService/GetTraceback", "/ray.rpc.RuntimeEnvService/GetOrCreateRuntimeEnv"]


def _http(host: str, port: int) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as r:
            return r.status, r.read(200)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError, http.client.HTTPException):  # not HTTP: a gRPC server answers with garbage
        return None, b""


def _grpc(host: str, port: int) -> set[str]:
    import grpc

    codes = set()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda x: x)
            try:
                call(b"", timeout=3)
                codes.add("OK")
            except grpc.RpcError as e:
                codes.add(e.code().name)
    return codes


def test_every_non_loopback_port_refuses_a_client_without_the_token():
    import psutil
    import ray

    from pipeline.config import load_config
    from pipeline.driver import init_ray

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
            status, body = _http(host, c.laddr.port)
            if status in (401, 403):
                refused_http += 1
            elif status == 200 and body.startswith(b"# HELP"):
                metrics += 1  # Prometheus text: read-only metrics, the README names these
            elif status is None:
                codes = _grpc(host, c.laddr.port)
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
