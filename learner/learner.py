"""Learner: one DeepSpeed data-parallel rank training the policy on shaped-reward batches.

A plain class; `pipeline/remote.py` makes one Ray actor per rank. Every rank receives the whole
train table (zero-copy from Ray's object store) and takes its own contiguous shard. One call of
`train_step` is one optimizer step and one new weight version. The loss is normalised by the
number of valid tokens in the *global* batch, so 1 rank and N ranks compute the same update.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.config import LearnerConfig


@dataclass(frozen=True)
class TrainStats:
    version: int  # weight version after this step
    loss: float  # policy loss + kl_coef * kl, token mean over this rank's shard
    policy_loss: float
    kl: float
    clip_frac: float
    grad_norm: float
    num_tokens: int  # valid (gradient-carrying) completion tokens on this rank
    seconds: float


class Learner:
    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        rows_per_step: int,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        dtype: str = "float32",
        pad_id: int = 0,
    ) -> None:
        import torch

        on_gpu = cfg.num_gpus > 0 and torch.cuda.is_available()
        if not on_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"  # must be set before deepspeed is imported
            torch.set_num_threads(max(1, math.ceil(cfg.num_cpus)))
        os.environ.update(
            RANK=str(rank), LOCAL_RANK="0" if not on_gpu else os.environ.get("LOCAL_RANK", "0"),
            WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import deepspeed
        from transformers import AutoModelForCausalLM

        if rows_per_step % world_size:
            raise ValueError(f"rows per step ({rows_per_step}) must divide evenly over learner.num_ranks={world_size}")
        self.cfg, self.rank, self.world_size, self.pad_id = cfg, rank, world_size, pad_id
        self.rows_per_rank = rows_per_step // world_size
        self.grad_accum = math.ceil(self.rows_per_rank / cfg.micro_batch_size)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": cfg.micro_batch_size * self.grad_accum * world_size,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        warmup = max(1, cfg.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        self.version = 0

    def train_step(self, table: pa.Table) -> TrainStats:
        """One optimizer step on this rank's shard of the train table; returns the new version."""
        import torch

        from learner.losses import ppo_loss, token_logprobs
        from pipeline.batching import pack

        start = time.perf_counter()
        if os.environ.get("PROBE_RL_FAIL_AT_STEP") == str(self.version + 1):  # fault injection for tests
            raise RuntimeError(f"injected learner failure at step {self.version + 1} (PROBE_RL_FAIL_AT_STEP)")
        assert table.num_rows == self.rows_per_rank * self.world_size, (table.num_rows, self.rows_per_rank)
        global_tokens = _valid_tokens(table)
        shard = table.slice(self.rank * self.rows_per_rank, self.rows_per_rank)
        use_ref = self.cfg.kl_coef > 0
        # DeepSpeed divides each micro-batch loss by grad_accum and averages over ranks; undo both so
        # the sum over all micro-batches and ranks is the token mean over the global batch.
        denom = max(global_tokens, 1) / (self.grad_accum * self.world_size)
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        local_tokens, grad_norm = 0, None
        self.engine.train()
        for m in range(self.grad_accum):
            mb = shard.slice(m * self.cfg.micro_batch_size, self.cfg.micro_batch_size)
            batch = pack(mb.column("prompt_ids").to_pylist(), mb.column("completion_ids").to_pylist(), self.pad_id)
            device = self.engine.device
            ids = batch.input_ids.to(device)
            logits = self.engine(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits
            logp = token_logprobs(logits, ids)  # (B, T-1)
            behavior = batch.completion_targets(mb.column("behavior_logprobs").to_pylist()).to(device)
            ref = batch.completion_targets(mb.column("ref_logprobs").to_pylist()).to(device) if use_ref else None
            loss_mask = torch.as_tensor(mb.column("loss_mask").to_numpy(zero_copy_only=False), device=device)
            token_mask = batch.completion_mask[:, 1:].to(device) & loss_mask[:, None]
            adv = torch.tensor(mb.column("advantage").to_numpy(), dtype=torch.float32, device=device)
            parts = ppo_loss(logp, behavior, adv, token_mask, self.cfg.clip_eps, ref, self.cfg.kl_coef, num_tokens=denom)
            self.engine.backward(parts.loss)
            if m == self.grad_accum - 1 and self.cfg.zero_stage == 0:
                grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 keeps whole grads; DeepSpeed reports none
            self.engine.step()
            # parts are normalised by `denom`; rescale to this rank's token mean for reporting
            n = int(parts.num_tokens)
            local_tokens += n
            scale = denom
            sums["loss"] += float(parts.loss.detach()) * scale
            sums["policy_loss"] += float(parts.policy_loss) * scale
            sums["kl"] += float(parts.kl) * scale
            sums["clip_frac"] += float(parts.clip_frac) * scale
        self.version += 1
        if self.cfg.zero_stage > 0:
            grad_norm = self.engine.get_global_grad_norm()
        mean = {k: v / max(local_tokens, 1) for k, v in sums.items()}
        return TrainStats(
            self.version, mean["loss"], mean["policy_loss"], mean["kl"], mean["clip_frac"],
            float(grad_norm) if grad_norm is not None else math.nan, local_tokens, time.perf_counter() - start,
        )

    def _gathered(self):
        """Context in which every parameter is whole on this rank (a collective under ZeRO-3)."""
        import contextlib

        import deepspeed

        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def get_weights(self):
        """The current weights as `WireWeights` (transformers names) on rank 0, None elsewhere.

        Call on every rank: under ZeRO-3 gathering the parameters is a collective.
        """
        from pipeline.weights import to_wire

        with self._gathered():
            if self.rank != 0:
                return None
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.engine.module.state_dict().items()}
        return to_wire(state, self.version)

    def save_checkpoint(self, directory: str) -> str | None:
        """Save the policy (transformers format), the Adam moments and the version, all as safetensors/JSON.

        Call on every rank (gathering is a collective under ZeRO). Written to a temporary folder and renamed,
        with the state file last, so a crash mid-save never leaves a checkpoint that looks complete.
        """
        from safetensors.torch import save_file

        moments = self._adam_moments()
        with self._gathered():
            if self.rank != 0:
                return None
            path = Path(directory) / f"step_{self.version:06d}"
            tmp = path.with_name(path.name + ".partial")
            self.engine.module.save_pretrained(tmp, safe_serialization=True)
            if moments:
                save_file(moments, str(tmp / "optimizer.safetensors"))
            (tmp / "probe_rl_state.json").write_text(json.dumps({"version": self.version,
                                                                 "zero_stage": self.cfg.zero_stage}) + "\n")
            if path.exists():
                import shutil

                shutil.rmtree(path)
            tmp.rename(path)
        return str(path)

    def _adam_moments(self) -> dict:
        """Full Adam moments per parameter on rank 0 ({} before the first step). A collective under ZeRO."""
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for name, p in self.engine.module.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                if self.cfg.zero_stage == 0:
                    value = self.engine.optimizer.state.get(p, {}).get(key)
                else:
                    value = safe_get_full_optimizer_state(p, key)
                if value is not None and self.rank == 0:
                    out[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
        return out

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, Adam moments, step count and LR schedule from `save_checkpoint`. Every rank."""
        import torch
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        version, weights, moments = read_checkpoint(path)
        params = dict(self.engine.module.named_parameters())
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"checkpoint {path} lacks weights for {missing[:3]}: it belongs to another model")
        for name, p in params.items():
            w = weights[name].to(p.dtype)
            if self.cfg.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                    if self.rank == 0:
                        p.copy_(w)
            else:
                with torch.no_grad():
                    p.copy_(w)
            if self.cfg.zero_stage > 0:
                safe_set_full_fp32_param(p, w.float())
            for key in ("exp_avg", "exp_avg_sq"):
                m = moments.get(f"{key}/{name}")
                if m is None:
                    continue
                if self.cfg.zero_stage == 0:
                    st = self.engine.optimizer.state[p]
                    st[key] = m.clone().to(p.device)
                    st["step"] = torch.tensor(float(version))
                else:
                    safe_set_full_optimizer_state(p, m, key)
        if self.cfg.zero_stage > 0 and moments:
            base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            for st in base.state.values():
                st["step"] = torch.tensor(float(version))
        for _ in range(version):  # the LR schedule resumes where it was
            self.engine.lr_scheduler.step()
        self.version = version
        return version

    def ready(self) -> int:
        return self.version


def read_checkpoint(path: str) -> tuple[int, dict, dict]:
    """(version, weights, Adam moments) of a checkpoint folder; a malformed one is refused with a clear
    message. Only JSON and safetensors are read: nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        state = json.loads((folder / "probe_rl_state.json").read_text())
        version = int(state["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder}: probe_rl_state.json is missing or malformed ({e})") from None
    weights: dict = {}
    moments: dict = {}
    files = sorted(folder.glob("*.safetensors"))
    if not any(f.name != "optimizer.safetensors" for f in files):
        raise ValueError(f"checkpoint {folder} holds no model weights (*.safetensors)")
    for f in files:
        try:
            (moments if f.name == "optimizer.safetensors" else weights).update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint file {f} is not a readable safetensors file: {e}") from None
    return version, weights, moments


def _grad_norm(module) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _valid_tokens(table: pa.Table) -> int:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.column("completion_ids"))
    return int(pc.sum(pc.if_else(table.column("loss_mask"), lengths, 0)).as_py() or 0)
