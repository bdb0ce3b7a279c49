"""Ray job submission: `probe-rl submit|status|logs|stop`.

`submit` validates the config here first (a bad key fails before anything is uploaded), then submits
`python -m pipeline.cli.main run` as a Ray job whose working directory is this project, with the resolved
config passed in the job's environment, so the cluster runs exactly what was validated. Clusters with
Ray token authentication need the token on this side too: `export RAY_AUTH_TOKEN=...` (or
`RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`).
"""

from __future__ import annotations

import os
import shlex
import time
from typing import TYPE_CHECKING

from pipeline.config import REPO_ROOT, Config, dump_toml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "PROBE_RL_RESOLVED_CONFIG"
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.parquet", "*.egg-info"]


def address_of(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address_of(address))


def submit(cfg: Config, address: str | None, python: str = "python", job_id: str | None = None,
           agent_wait_s: float = 120.0) -> str:
    """Submit a run; returns the job id."""
    entrypoint = f"{shlex.quote(python)} -m pipeline.cli.main run --config-env {CONFIG_ENV}"
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES,
                   "env_vars": {CONFIG_ENV: dump_toml(cfg), "PYTHONUNBUFFERED": "1"}}
    c = client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        except RuntimeError as e:
            # A head that has just started answers 500 until its job agent is up: wait for it, briefly.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_for(job_id: str, address: str | None, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its final status name. Raises TimeoutError naming the job."""
    from ray.job_submission import JobStatus

    c, deadline = client(address), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")


def follow_logs(job_id: str, address: str | None) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client(address).tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
