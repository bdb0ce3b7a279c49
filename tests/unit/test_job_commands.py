"""Job commands never hang and take an address as a Ray user writes it; `run` tells a dashboard URL from a
cluster address (pipeline/cli/jobs.py: address_of, bounded; pipeline/config.py: cluster_address)."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.cli import jobs
from pipeline.cli.main import main
from pipeline.config import ConfigError, cluster_address


@pytest.mark.parametrize("given, url", [
    ("10.0.0.5:8265", "http://10.0.0.5:8265"),
    ("http://10.0.0.5:8265/", "http://10.0.0.5:8265"),
    ("https://ray.example.org", "https://ray.example.org"),
    ("head", "http://head"),
])
def test_an_address_with_or_without_its_scheme(given, url):
    assert jobs.address_of(given) == url


@pytest.mark.parametrize("given, says", [
    ("10.0.0.5:6379", "looks like the cluster's GCS port; the job commands talk to its dashboard: --address "
                      "http://10.0.0.5:8265"),
    ("ray://10.0.0.5:10001", "is a Ray Client address"),
])
def test_a_cluster_or_client_address_is_refused_naming_the_dashboard(given, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        jobs.address_of(given)


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers (a wrong port behind a load balancer, a hung head)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.mark.parametrize("argv", [["status", "raysubmit_1"], ["logs", "raysubmit_1"], ["stop", "raysubmit_1"],
                                  ["submit", "--pipeline.num_steps", "1"]])
def test_job_commands_against_a_server_that_never_answers_end_within_their_bound(argv, silent_server, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(jobs, "ANSWER_WAIT_S", 1.5)
    start = time.monotonic()
    assert main([*argv, "--address", silent_server]) == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert f"the Ray dashboard at http://{silent_server} accepted the connection but did not answer" in err
    assert len(err.strip().splitlines()) == 1


def test_a_job_command_to_a_gcs_port_is_one_line_and_exit_2(capsys):
    assert main(["status", "raysubmit_1", "--address", "127.0.0.1:6379"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "probe-rl status: 127.0.0.1:6379 looks like the cluster's GCS port; the job commands talk to its dashboard: "
        "--address http://127.0.0.1:8265"]


def test_run_refuses_a_dashboard_url_before_making_a_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert main(["run", "--run.output_dir", str(tmp_path / "runs"), "--pipeline.num_steps", "1"]) == 2
    assert "RAY_ADDRESS=http://10.0.0.5:8265 is a Ray dashboard URL" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert cluster_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"  # inside a submitted job
    assert cluster_address(None, {}) is None  # a new local instance
    with pytest.raises(ConfigError, match="run.ray_address=https://h:8265 is a Ray dashboard URL"):
        cluster_address("https://h:8265", {})
