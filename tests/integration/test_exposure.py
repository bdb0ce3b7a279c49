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


def test_a_real_run_listens_on_loopback_except_rays_token_guarded_ports(toy_world, toy_overrides, tmp_path):
    """A real local run: two learner ranks (DeepSpeed's rendezvous store and gloo sockets), the collective weight
    transfer (its store and gloo sockets in the learner and in vLLM's worker), a vLLM generator, a scorer. Every
    socket any process of the run listens on, polled while it runs, is on loopback, or is one of Ray's own
    servers, which refuse a client without the token (probed as it is found), or one of its read-only metrics
    endpoints. probe-rl's own stores and sockets are seen, on loopback."""
    import subprocess
    import sys
    import time

    import psutil

    from ._helpers import ROOT, toy_args

    args = toy_args(toy_overrides, tmp_path, "exposed", 3) + ["--learner.num_ranks", "2"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen: dict[tuple[str, int], tuple[str, str]] = {}  # (address, port) -> (process title, what it is)
    while driver.poll() is None:
        try:
            procs = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in procs:
            try:
                title = (proc.cmdline() or [proc.name()])[0]
                conns = proc.net_connections("tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                key = (c.laddr.ip, c.laddr.port)
                if c.status != psutil.CONN_LISTEN or key in seen:
                    continue
                if c.laddr.ip.startswith("127.") or c.laddr.ip in ("::1", "::ffff:127.0.0.1"):
                    seen[key] = (title, "loopback")
                    continue
                # this machine's own address, or loopback for a socket listening on every interface
                host = "127.0.0.1" if c.laddr.ip in ("0.0.0.0", "::") else c.laddr.ip
                status, body = _http(host, c.laddr.port)
                if status in (401, 403):
                    seen[key] = (title, "refused")
                elif status == 200 and body.startswith(b"# HELP"):
                    seen[key] = (title, "metrics")
                elif status is None:
                    codes = _grpc(host, c.laddr.port)
                    seen[key] = (title, "refused" if "UNAUTHENTICATED" in codes and "OK" not in codes
                                 else f"gRPC {sorted(codes)}")
                else:
                    seen[key] = (title, f"HTTP {status}")
        time.sleep(0.3)
    log, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, log[-3000:]
    open_ = {k: v for k, v in seen.items() if v[1] not in ("loopback", "refused", "metrics")}
    assert not open_, f"listeners that answer without Ray's token: {open_}"
    learners = [v for v in seen.values() if v[0].startswith("ray::Learner")]
    # rank 0's rendezvous store, both ranks' gloo sockets and the transfer group's store: on loopback
    assert sum(1 for _, what in learners if what == "loopback") >= 3, learners
    assert all(what in ("loopback", "refused") for _, what in learners), learners  # Ray's worker gRPC: refused
    assert any(t.startswith("ray::Generator") and what == "loopback" for t, what in seen.values()), seen
    assert sum(1 for _, what in seen.values() if what == "metrics") <= 3

