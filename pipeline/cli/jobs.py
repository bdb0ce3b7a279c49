"""Ray job submission: `probe-rl submit|status|logs|stop`.

`submit` validates the config here first (a bad key or a missing file fails before anything is uploaded), then
submits `python -m pipeline.cli.main run` as a Ray job whose working directory is an upload of the user's working
directory (their reward module and data; probe-rl itself is installed on the nodes), with the resolved config
passed in the job's environment and its file paths relative to that upload, so the cluster runs exactly what was
validated. Clusters with
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
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pipeline.config import BUILT_IN_NAMES, INPUT_PATH_KEYS, Config, dump_toml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

T = TypeVar("T")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "PROBE_RL_RESOLVED_CONFIG"
UPLOAD_EXCLUDES = [".venv", "venv", ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
                   "node_modules", ".mypy_cache", "wandb"]
UPLOAD_LIMIT_MIB = 100  # Ray packs the working directory into its object store; beyond this, move data to storage


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(name == p or (p.startswith("*") and name.endswith(p[1:])) for p in patterns)


def upload_size(root: Path, patterns: list[str], limit: int) -> tuple[int, list[tuple[int, str]]]:
    """Bytes of what `submit` would upload from `root` (stopping once past `limit`), and the largest top-level
    entries, so a refusal can say what to move out."""
    tops: dict[str, int] = {}
    total = 0
    for top in root.iterdir():
        if _excluded(top.name, patterns) or top.is_symlink():
            continue
        size = 0
        if top.is_file():
            size = top.stat().st_size
        else:
            for folder, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if not _excluded(d, patterns)]
                size += sum((Path(folder) / f).stat().st_size for f in files
                            if not _excluded(f, patterns) and not (Path(folder) / f).is_symlink())
                if total + size > limit:
                    break
        tops[top.name] = size
        total += size
        if total > limit:
            break
    return total, sorted(((v, k) for k, v in tops.items()), reverse=True)[:3]


def for_upload(cfg: Config, root: Path) -> tuple[Config, list[str]]:
    """The config as the job reads it in the uploaded copy of `root` (its working directory on the cluster): input
    files under `root` named relative to it; files elsewhere that exist here kept at their path (they are not
    uploaded: every node must see them there, e.g. shared storage), and said so; names that are no file here (a
    hub id, a cluster path) kept as they are. The notes say what was not uploaded."""
    root = root.resolve()
    cfg = cfg.model_copy(deep=True)
    notes: list[str] = []

    def place(value: str | None, key: str, probe: bool = False) -> str | None:
        if not value or value.split(":")[0] in BUILT_IN_NAMES:
            return value
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        here = path.exists() or (probe and path.with_name(path.name + ".json").is_file())
        if not here:
            if Path(value).is_absolute():
                notes.append(f"{key} = {value}: not on this machine; it must exist at that path on the cluster")
            return value
        path = path.resolve()
        if path.is_relative_to(root):
            rel = path.relative_to(root)
            if any(_excluded(part, UPLOAD_EXCLUDES) for part in rel.parts):
                raise ValueError(f"{key} = {value} is under {rel.parts[0]}/, which submit does not upload; move it "
                                 f"elsewhere under {root}")
            return rel.as_posix() or "."
        notes.append(f"{key} = {value}: outside the uploaded folder {root}; not uploaded, so it must exist at that "
                     "path on every node (shared storage)")
        return str(path)

    for section, key in INPUT_PATH_KEYS:
        part = getattr(cfg, section)
        setattr(part, key, place(getattr(part, key), f"{section}.{key}"))
    cfg.task.python_path = [place(p, "task.python_path") for p in cfg.task.python_path]
    for i, probe in enumerate(cfg.scorer.probes):
        probe.path = place(probe.path, f"scorer.probes[{i}].path", probe=True)
    return cfg, notes


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
           agent_wait_s: float = 120.0, working_dir: str | Path | None = None,
           log: Callable[[str], None] = print) -> str:
    """Submit a run whose working directory on the cluster is an upload of `working_dir` (default: this process's
    working directory, the user's project; probe-rl itself is installed on the cluster's nodes), after checking
    the files the config names and the upload's size; returns the job id."""
    root = Path(working_dir or Path.cwd()).resolve()
    if not root.is_dir():
        raise ValueError(f"--working-dir {root} is not a folder")
    cfg, notes = for_upload(cfg, root)
    excludes = list(UPLOAD_EXCLUDES)
    out = Path(cfg.run.output_dir).expanduser()
    if not out.is_absolute() and out.parts:
        excludes.append(out.parts[0])  # earlier runs' outputs stay here
    limit = UPLOAD_LIMIT_MIB * 2**20
    size, largest = upload_size(root, excludes, limit)
    if size > limit:
        biggest = ", ".join(f"{name} ({n / 2**20:.0f} MiB)" for n, name in largest)
        raise ValueError(f"submit uploads the working directory {root} to the cluster, and it holds over "
                         f"{UPLOAD_LIMIT_MIB} MiB (largest: {biggest}): run submit from your project's folder, give "
                         "--working-dir, or move large data to storage every node sees and name it by its path")
    for note in notes:
        log(f"note: {note}")
    entrypoint = f"{shlex.quote(python)} -m pipeline.cli.main run --config-env {CONFIG_ENV}"
    runtime_env = {"working_dir": str(root), "excludes": excludes,
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
