"""Ray job submission: `probe-rl submit|status|logs|stop`.

`submit` validates the config here first (a bad key fails before anything is uploaded), then submits
`python -m pipeline.cli.main run` as a Ray job whose working directory is this project, with the resolved
config passed in the job's environment, so the cluster runs exactly what was validated. Clusters with
Ray token authentication need the token on this side too: `export RAY_AUTH_TOKEN=...` (or
`RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`).
"""

from __future__ import annotations

import os
import queue
import shlex
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pipeline.config import REPO_ROOT, Config, dump_toml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

T = TypeVar("T")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "PROBE_RL_RESOLVED_CONFIG"
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.parquet", "*.egg-info"]


ANSWER_WAIT_S = 15.0  # how long a job command waits for the dashboard to answer a request
UPLOAD_WAIT_S = 600.0  # how long `submit` waits for its upload and the job's creation


def address_of(address: str | None) -> str:
    """The dashboard URL the job commands talk to: --address, else RAY_ADDRESS, else the local default; `host:port`
    without a scheme gets http://. A cluster (GCS) or Ray Client address is refused, naming the dashboard's."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "http", address
    if scheme not in ("http", "https"):
        raise ValueError(f"{address} is a Ray Client address; the job commands talk to the cluster's dashboard: "
                         "--address http://<head>:8265")
    if rest.rpartition(":")[2] in ("6379", "10001"):
        raise ValueError(f"{address} looks like the cluster's {'GCS' if rest.endswith('6379') else 'Ray Client'} port;"
                         f" the job commands talk to its dashboard: --address {scheme}://{rest.rpartition(':')[0]}:8265")
    return f"{scheme}://{rest}"


def bounded(fn: Callable[[], T], timeout_s: float, what: str, address: str) -> T:
    """`fn()` (a call into Ray's job client, whose HTTP requests have no time limit), given up after `timeout_s`
    with a TimeoutError that says what was waited for; the call is left to its daemon thread."""
    done: queue.Queue = queue.Queue(maxsize=1)

    def call() -> None:
        try:
            done.put((True, fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            done.put((False, e))

    threading.Thread(target=call, daemon=True, name=f"probe-rl {what}").start()
    try:
        ok, value = done.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"the Ray dashboard at {address} accepted the connection but did not answer {what} "
                           f"within {timeout_s:.0f} s: is it the dashboard's address (port 8265) and is the head "
                           "healthy?") from None
    if not ok:
        raise value
    return value


def client(address: str | None) -> JobSubmissionClient:
    """Ray's job client for the dashboard at `address`; its creation (a version check) bounded by ANSWER_WAIT_S."""
    from ray.job_submission import JobSubmissionClient

    url = address_of(address)
    return bounded(lambda: JobSubmissionClient(url), ANSWER_WAIT_S, "the version check", url)


def submit(cfg: Config, address: str | None, python: str = "python", job_id: str | None = None,
           agent_wait_s: float = 120.0) -> str:
    """Submit a run; returns the job id."""
    entrypoint = f"{shlex.quote(python)} -m pipeline.cli.main run --config-env {CONFIG_ENV}"
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES,
                   "env_vars": {CONFIG_ENV: dump_toml(cfg), "PYTHONUNBUFFERED": "1"}}
    c, url = client(address), address_of(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return bounded(lambda: c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id),
                           UPLOAD_WAIT_S, "the upload and the job's creation", url)
        except RuntimeError as e:
            # A head that has just started answers 500 until its job agent is up: wait for it, briefly.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_for(job_id: str, address: str | None, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its final status name. Raises TimeoutError naming the job."""
    from ray.job_submission import JobStatus

    c, deadline, url = client(address), time.monotonic() + timeout_s, address_of(address)
    while time.monotonic() < deadline:
        status = bounded(lambda: c.get_job_status(job_id), ANSWER_WAIT_S, f"the status of job {job_id}", url)
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
