"""A real Ray head (`ray start --head`) with token authentication, and `probe-rl submit` against it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(16)
    dash = _port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    # A temp dir of its own: teardown stops exactly this head's processes (`ray stop` would stop every
    # Ray instance on the machine). Kept short: Ray's socket paths must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="prl-", dir="/tmp")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={_port()}", "--dashboard-host=127.0.0.1",
                    f"--temp-dir={temp_dir}",
                    # Ports of its own: the job agent's default (52365) may still be held by another head
                    # on this machine, and then no job can be submitted ("No available agent").
                    f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
                    f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}",
                    f"--ray-client-server-port={_port()}",
                    f"--dashboard-port={dash}", "--num-cpus=3", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job server comes up a moment after `ray start` returns
        try:
            socket.create_connection(("127.0.0.1", dash), timeout=1).close()
            break
        except OSError:
            time.sleep(1)
    yield address, token, env
    subprocess.run(["pkill", "-f", temp_dir], capture_output=True, timeout=60)
    time.sleep(2)
    subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True, timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def test_submit_without_token_is_refused(ray_head, tmp_path):
    address, _, env = ray_head
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    out = _cli(["submit", "--address", address, "--pipeline.num_steps", "1"], no_token)
    assert out.returncode == 1 and "authentication failed" in out.stderr, out.stderr
    wrong = {**no_token, "RAY_AUTH_TOKEN": "0" * 32, "RAY_AUTH_MODE": "token"}
    out = _cli(["submit", "--address", address, "--pipeline.num_steps", "1"], wrong)
    assert out.returncode == 1 and "authentication failed" in out.stderr, out.stderr


def test_submitted_toy_run_succeeds_and_writes_metrics(ray_head, toy_overrides, tmp_path):
    address, _, env = ray_head
    out_dir = tmp_path / "runs"
    toy = toy_overrides["toy"]
    args = ["submit", "--address", address, "--pipeline.num_steps", "2", "--pipeline.prompts_per_step", "8",
            "--pipeline.group_size", "4", "--learner.micro_batch_size", "16", "--task.num_prompts", "64",
            "--task.eval_prompts", "8", "--toy.cache_dir", toy["cache_dir"], "--toy.sft_steps", str(toy["sft_steps"]),
            "--toy.probe_samples", str(toy["probe_samples"]), "--run.output_dir", str(out_dir),
            "--run.name", "submitted", "--run.progress", "false"]
    # --follow: one process streams the job's logs until it ends (a status command every few seconds would start
    # a Python process each time, on the cores the job runs on); then `status` and `logs` once each
    job_id = f"probe-rl-{secrets.token_hex(4)}"
    out = _cli([*args, "--follow", "--job-id", job_id], env, timeout=900)  # submit waits up to 120 s for a job agent
    assert out.stdout.startswith(f"{job_id}\n"), out.stdout[:300]
    assert out.returncode == 0 and out.stdout.strip().endswith(f"job {job_id}: SUCCEEDED"), out.stdout[-3000:] + out.stderr
    assert "summary" in out.stdout  # the run's own output, streamed
    status = _cli(["status", job_id, "--address", address], env).stdout.strip()
    logs = _cli(["logs", job_id, "--address", address], env).stdout
    assert status.startswith(f"{job_id}: SUCCEEDED"), logs[-3000:]
    rows = pq.read_table(out_dir / "submitted" / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["version"] for r in rows] == [1, 2] and [r["rollout/rows"] for r in rows] == [32, 32]  # 8 x 4 a step
    assert "summary" in logs
