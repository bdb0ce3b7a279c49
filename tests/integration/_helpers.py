"""Helpers shared by the integration tests: train tables with real behaviour log-probs, learner ranks that
meet as the fleet starts them, one collective weight sync, and transformers' greedy completions."""

from __future__ import annotations

import functools
import http.client
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import LearnerConfig
from pipeline.transport.weights import BACKEND_GLOO

TIMEOUT = 300
ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=16)
def train_batch(model_path: str, rows: int, seed: int) -> pa.Table:
    """A train table with real behaviour log-probs (so PPO ratios start at 1) and fixed advantages (kept per
    process: a table cannot be changed, and each costs a model load)."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.batching import pack
    from pipeline.data.schema import NONFINITE, REF_LOGPROBS, REWARD_FIELDS, rollout_table

    rng = np.random.default_rng(seed)
    prompts = [[1, *rng.integers(4, 14, 3).tolist(), 14, *rng.integers(4, 14, 2).tolist(), 17] for _ in range(rows)]
    comps = [rng.integers(4, 14, rng.integers(1, 4)).tolist() + [2] for _ in range(rows)]
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    b = pack(prompts, comps)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    behavior = [v.tolist() for v in b.completion_values(lp, shift=1)]
    table = rollout_table(prompts, comps, behavior, groups=[i // 4 for i in range(rows)])
    table = table.append_column(REF_LOGPROBS, pa.array(behavior, REF_LOGPROBS.type))
    table = table.append_column(NONFINITE, pa.array([False] * rows))
    reward = rng.random(rows).astype(np.float32)
    mask = np.ones(rows, bool)
    mask[3] = False  # a screened row: must carry no gradient on any rank
    adv = rng.standard_normal(rows).astype(np.float32) * mask
    for f, v in zip(REWARD_FIELDS, (reward, reward, mask, adv), strict=True):
        table = table.append_column(f, pa.array(v, f.type))
    return table


def start_learners(model_path: str, cfg: LearnerConfig, rows: int) -> list:
    from learner.learner import Learner
    from pipeline.loop.fleet import setup_learners
    from pipeline.loop.remote import make_actor

    actors = [make_actor(Learner, "learner", 0.5, 0, model_path=model_path, cfg=cfg, rows_per_step=rows, rank=r,
                         world_size=cfg.num_ranks) for r in range(cfg.num_ranks)]
    setup_learners(actors, TIMEOUT)
    return actors


def collective_sync(learners, receivers, bucket_bytes=2**20, timeout_s=60.0, name="test"):
    """Build a transfer group of `learners` and `receivers` (Receiver objects), send once; SendStats per rank."""
    from pipeline.loop.remote import ReceiverClient, wait

    client = ReceiverClient(receivers, TIMEOUT)
    wait([lr.init_weight_transfer.remote(client, BACKEND_GLOO, bucket_bytes, timeout_s, name) for lr in learners],
         "learner", TIMEOUT)
    return wait([lr.send_weights.remote() for lr in learners], "learner", TIMEOUT)


def hf_greedy(model_dir, prompt_ids, max_new_tokens=8, model=None):
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def _tree(root: int) -> list:
    """`root` and every process below it (a run's driver: its Ray instance, actors and vLLM's processes). Tests
    look for processes only there, so that nothing else running on the machine is ever touched."""
    import psutil

    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _titled(proc, prefix: str) -> bool:
    """Whether `proc` is alive (not a zombie: a container's first process may never reap those) with a title
    starting with `prefix`; False once it is gone."""
    import psutil

    try:
        return (proc.cmdline() or [""])[0].startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def titled_pids(prefix: str, root: int | None = None) -> list[int]:
    """PIDs of live processes under `root` (default: this process) whose title starts with `prefix` (vLLM titles
    its workers "VLLM::Worker_TP1")."""
    return [p.pid for p in _tree(root or os.getpid()) if _titled(p, prefix)]


def ray_worker_pids(actor_class: str, root: int | None = None) -> list[int]:
    """PIDs of the live Ray worker processes under `root` (default: this process) that run an actor of this class:
    Ray titles them `ray::<Class>...`, and their parent is a raylet (a child they forked may carry the same
    title)."""
    import psutil

    out = []
    for proc in _tree(root or os.getpid()):
        try:
            if _titled(proc, f"ray::{actor_class}") and proc.parent().name() == "raylet":
                out.append(proc.pid)
        except (psutil.NoSuchProcess, AttributeError):  # gone meanwhile (AttributeError: no parent left)
            pass
    return out


def runs_as(pid: int, title: str) -> bool:
    """Whether process `pid` is alive (not a zombie) with a title starting with `title`."""
    import psutil

    try:
        return _titled(psutil.Process(pid), title)
    except psutil.NoSuchProcess:
        return False


def steps_done(metrics: Path) -> int:
    try:
        return len(pq.read_table(metrics).column("step"))
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0


class Killer(threading.Thread):
    """Sends SIGKILL (or the signal a plan entry names, e.g. SIGSTOP), from outside, to each target once the run
    has logged the given number of steps: an actor class's worker process under `root` (the run's driver), a
    process id, or the first of the pids a callable returns. `then`, if given, is called once the whole plan is
    carried out."""

    def __init__(self, metrics: Path, plan: list[tuple], root: int, deadline_s: float = 900, then=None) -> None:
        super().__init__(daemon=True)
        self.metrics, self.plan, self.root, self.then = metrics, list(plan), root, then
        self.deadline = time.monotonic() + deadline_s
        self.killed: list[tuple[str | int, int, int]] = []  # (target, pid, steps logged when killed)
        self.errors: list[str] = []  # what went wrong while looking for or signalling a target (tried again)

    def run(self) -> None:
        while self.plan and time.monotonic() < self.deadline:
            time.sleep(0.05)
            at, target, *sig = self.plan[0]
            done = steps_done(self.metrics)
            if done < at:  # (the process table is read only once the step is reached: it costs CPU the run needs)
                continue
            try:  # a process may end between being listed and signalled: look again rather than end the thread
                pids = (target() if callable(target) else ray_worker_pids(target, self.root)
                        if isinstance(target, str) else [target])
                if pids:
                    os.kill(pids[0], sig[0] if sig else signal.SIGKILL)
                    self.killed.append((target, pids[0], done))
                    self.plan.pop(0)
            except Exception as e:  # noqa: BLE001 - reported by `report`, never silently ending the plan
                self.errors.append(f"at {done} steps, {target}: {type(e).__name__}: {e}")
        if not self.plan and self.then is not None:
            self.then()

    def report(self) -> str:
        """What was sent, what was left of the plan and what failed on the way, for an assertion's message."""
        return f"sent {self.killed}; not sent {self.plan}; errors {self.errors[-5:]}"


# methods of the services Ray's processes serve; each server answers UNAUTHENTICATED for its own without a token
GRPC_METHODS = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
                "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks",
                "/ray.rpc.ReporterService/GetTraceback", "/ray.rpc.RuntimeEnvService/GetOrCreateRuntimeEnv"]


def http_answer(host: str, port: int) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as r:
            return r.status, r.read(200)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError, http.client.HTTPException):  # not HTTP: a gRPC server answers with garbage
        return None, b""


def grpc_codes(host: str, port: int) -> set[str]:
    """The status codes a client without Ray's token gets from each of `GRPC_METHODS` on this port (a server
    answers UNIMPLEMENTED for services it does not run). A call that outruns its deadline (a server slow to
    answer on a busy machine) is tried again with a longer one, twice, before DEADLINE_EXCEEDED counts."""
    import grpc

    codes = set()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda x: x)
            for timeout in (3, 10, 30):
                try:
                    call(b"", timeout=timeout)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                if code != "DEADLINE_EXCEEDED":
                    break
            codes.add(code)
    return codes


def what_answers(host: str, port: int) -> str:
    """What a port other hosts could reach answers a client without Ray's token: "refused HTTP" (401/403),
    "refused gRPC" (UNAUTHENTICATED and never OK), "metrics" (read-only Prometheus text), or what else it said."""
    status, body = http_answer(host, port)
    if status in (401, 403):
        return "refused HTTP"
    if status == 200 and body.startswith(b"# HELP"):
        return "metrics"
    if status is None:
        codes = grpc_codes(host, port)
        return "refused gRPC" if "UNAUTHENTICATED" in codes and "OK" not in codes else f"gRPC {sorted(codes)}"
    return f"HTTP {status}"


def _listening() -> dict[int, tuple[str, int]]:
    """Every TCP socket listening on this machine (its network namespace), read from /proc/net: inode ->
    (address, port). One read of two small files, however many processes there are."""
    import ipaddress

    out = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)  # each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.IPv6Address(packed) if v6 else ipaddress.IPv4Address(packed)
            ip = ip.ipv4_mapped or ip if v6 else ip
            out[int(f[9])] = (str(ip), int(port, 16))
    return out


def _socket_owners(root: int, inodes: set[int]) -> dict[int, str]:
    """inode -> title of the process under `root` that holds it, for those of `inodes` held there."""
    import psutil

    owners = {}
    for proc in _tree(root):
        try:
            fd_dir = Path(f"/proc/{proc.pid}/fd")
            links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
            title = (proc.cmdline() or [proc.name()])[0]
        except (OSError, psutil.Error):
            continue
        for link in links:
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    owners[inode] = title
    return owners


class Listeners(threading.Thread):
    """Every TCP socket any process under a run's driver listens on, seen while the run goes on: `seen` maps
    (address, port) to (process title, what it is), where what is "loopback", or for a socket other hosts could
    reach, what `probe(host, port)` says of it. Polls /proc/net every `every_s` (a few reads of small files;
    the processes' own socket tables are read only when a new listening socket appears), so that it takes
    almost nothing from the run it watches."""

    def __init__(self, root: int, probe, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.probe, self.every_s = root, probe, every_s
        self.seen: dict[tuple[str, int], tuple[str, str]] = {}
        self.stop = threading.Event()
        self._known: set[int] = set()  # inodes placed (ours, classified) or not ours

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.every_s)
        self.poll()

    def poll(self) -> None:
        listening = _listening()
        new = set(listening) - self._known
        if not new:
            return
        owners = _socket_owners(self.root, new)
        for inode in new:
            self._known.add(inode)  # a socket of another process (or one gone already) is not looked at again
            if inode not in owners:
                continue
            ip, port = listening[inode]
            title = owners[inode]
            if (ip, port) in self.seen:
                continue
            if ip.startswith("127.") or ip == "::1":
                self.seen[(ip, port)] = (title, "loopback")
            else:  # this machine's own address, or loopback for a socket listening on every interface
                self.seen[(ip, port)] = (title, self.probe("127.0.0.1" if ip in ("0.0.0.0", "::") else ip, port))

    def finish(self) -> dict[tuple[str, int], tuple[str, str]]:
        self.stop.set()
        self.join(timeout=60)
        return self.seen


def toy_args(toy_overrides, out_dir: Path, name: str, steps: int) -> list[str]:
    toy = toy_overrides["toy"]
    return ["run", "--toy.cache_dir", toy["cache_dir"], "--toy.sft_steps", str(toy["sft_steps"]),
            "--toy.probe_samples", str(toy["probe_samples"]), "--task.num_prompts", "256", "--task.eval_prompts", "8",
            "--pipeline.num_steps", str(steps), "--pipeline.prompts_per_step", "8", "--pipeline.group_size", "4",
            "--learner.micro_batch_size", "16", "--run.output_dir", str(out_dir), "--run.name", name,
            "--run.progress", "false"]


def cli(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`probe-rl ARGS` in a process of its own (its own local Ray instance)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def same_rows(got: list[dict], want: list[dict], keys_exact=("rollout/", "scorer/hack", "version", "step",
                                                              "pipeline/staleness"),
              keys_close=("learner/loss", "learner/policy_loss", "learner/kl", "learner/grad_norm")) -> None:
    """Metric rows equal to a reference run's: rollout and probe figures exactly (NaN equals NaN), the learner's
    to float noise. Timings and restart counters are allowed to differ."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if key.startswith(keys_exact) and not key.startswith(("rollout/tokens_per_s",)):
                both_nan = isinstance(value, float) and math.isnan(value) and math.isnan(g[key])
                assert both_nan or g[key] == value, (g["step"], key, g[key], value)
            elif key.startswith(keys_close):
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (g["step"], key, g[key], value)


def same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold equal weights and fp32 optimizer state (masters, moments), bit for bit."""
    from safetensors import safe_open

    for sub in ("model.safetensors", "optimizer/optimizer.safetensors"):
        with safe_open(str(a / sub), "pt") as fa, safe_open(str(b / sub), "pt") as fb:
            keys = sorted(k for k in fa.keys() if not k.startswith("rng/"))
            assert keys == sorted(k for k in fb.keys() if not k.startswith("rng/")), sub
            differ = [k for k in keys if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
            assert not differ, f"{sub}: {len(differ)} of {len(keys)} tensors differ, first {differ[0]}"


@contextmanager
def environ(**values: str):
    """`values` set in this process's environment inside the block, the previous values back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def update_mid_generation(gen, state: dict, version: int, after_steps: int, switch: Path) -> tuple[threading.Thread, dict]:
    """Load `state` into generator `gen` as `version` from another thread (as Ray's weights concurrency group
    delivers it) once `after_steps` more decoding steps ran; `switch` (the slow-down file) is removed after.
    Returns the started thread and its outcome ({"version"} or {"error"})."""
    out: dict = {}
    start = gen.steps

    def update() -> None:
        try:
            while gen.steps < start + after_steps:
                time.sleep(0.005)
            out["version"] = gen.load_weights({k: v.clone() for k, v in state.items()}, version)
        except BaseException as e:  # noqa: BLE001 - the caller reports it
            out["error"] = e
        finally:
            switch.unlink(missing_ok=True)

    thread = threading.Thread(target=update)
    thread.start()
    return thread, out


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """transformers' log-prob of each completion token after the prompt and the tokens before it."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return [float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]
