"""Helpers shared by the integration tests: train tables with real behaviour log-probs, learner ranks that
meet as the fleet starts them, one collective weight sync, and transformers' greedy completions."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
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


def train_batch(model_path: str, rows: int, seed: int) -> pa.Table:
    """A train table with real behaviour log-probs (so PPO ratios start at 1) and fixed advantages."""
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
    process id, or the first of the pids a callable returns."""

    def __init__(self, metrics: Path, plan: list[tuple], root: int, deadline_s: float = 900) -> None:
        super().__init__(daemon=True)
        self.metrics, self.plan, self.root = metrics, list(plan), root
        self.deadline = time.monotonic() + deadline_s
        self.killed: list[tuple[str | int, int, int]] = []  # (target, pid, steps logged when killed)

    def run(self) -> None:
        while self.plan and time.monotonic() < self.deadline:
            time.sleep(0.05)
            at, target, *sig = self.plan[0]
            done = steps_done(self.metrics)
            if done < at:  # (the process table is read only once the step is reached: it costs CPU the run needs)
                continue
            pids = (target() if callable(target) else ray_worker_pids(target, self.root) if isinstance(target, str)
                    else [target])
            if pids:
                os.kill(pids[0], sig[0] if sig else signal.SIGKILL)
                self.killed.append((target, pids[0], done))
                self.plan.pop(0)


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

