"""Learner: one DeepSpeed data-parallel rank training the policy on shaped-reward batches.

A plain class; `pipeline/loop/remote.py` makes one Ray actor per rank. Construction only records settings;
`setup(master_addr, master_port)` joins the ranks' process group at rank 0's node (the driver asks rank 0
for `address()` first, so ranks may sit on different nodes) and builds the model and DeepSpeed engine.

Every rank receives the whole train table (zero-copy from Ray's object store) and takes its own
contiguous shard. One call of `train_step` is one optimizer step and one new weight version. The loss is
normalised by the number of valid tokens in the *global* batch, so 1 rank and N ranks compute the same
update. Policy log-probs come from `pipeline/data/logprobs.py` (the output head a chunk at a time, checkpointed);
a row with a non-finite behaviour or reference log-prob gets no gradient and is counted. shaping.kind
"loss" adds the probe's score on this very pass to the loss; "ablate" projects the probe direction out of
the residual stream at its layer during the pass. New weights leave through `send_weights` (the collective transport, see pipeline/transport/weights.py) or
`get_weights` (the object store); checkpoints through `save_checkpoint` (learner/checkpoint.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import LearnerConfig, ShapingConfig
from pipeline.faults import maybe_fail_step

if TYPE_CHECKING:
    import numpy as np

    from learner.weight_source import PolicySource
    from pipeline.transport.weights import SendStats, WireWeights


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
    probe_score: float = float("nan")  # shaping.kind = "loss": mean probe score on this rank's own forward pass
    num_rows: int = 0  # rows that carried a gradient on this rank
    nonfinite_rows: int = 0  # rows of the whole step dropped for a non-finite behaviour or reference log-prob
    mismatch: dict | None = None  # learner.losses.mismatch_sums over this rank's shard (mismatch_metrics combines)
    threads: float = 0.0  # CPU threads it trained on, mean over micro-batches (pipeline.cores; 0: a GPU rank)


class Learner:
    def __init__(self, *, model_path: str, cfg: LearnerConfig, rows_per_step: int, rank: int = 0,
                 world_size: int = 1, dtype: str = "float32", pad_id: int = 0, shaping: ShapingConfig | None = None,
                 probe: tuple[str, str | None] | None = None) -> None:
        if rows_per_step % world_size:
            raise ValueError(f"rows per step ({rows_per_step}) must divide evenly over learner.num_ranks={world_size}")
        self.model_path, self.cfg, self.dtype, self.pad_id = model_path, cfg, dtype, pad_id
        self.rank, self.world_size = rank, world_size
        self.rows_per_rank = rows_per_step // world_size
        self.grad_accum = math.ceil(self.rows_per_rank / cfg.micro_batch_size)
        self.engine = None
        from pipeline.cores import CoreShare

        self.cores = CoreShare.for_role(cfg.num_cpus, cpu=not self.on_gpu)  # pipeline.cores: threads per phase
        self.transfer = None  # the trainer-side weight-transfer engine, once a group is built
        self._source = None
        self.version = 0
        # shaping.kind "loss" and "ablate" act on this learner's own activations at the shaping probe's layer
        self.shaping = shaping if shaping is not None and shaping.kind in ("loss", "ablate") else None
        self.probe = None
        if self.shaping is not None:
            from probes.probe import load_probe, unit_direction

            path, aggregation = probe
            self.probe = load_probe(path)
            if aggregation is not None:
                self.probe.aggregation = aggregation
            self.direction = unit_direction(self.probe.weight)

    @property
    def on_gpu(self) -> bool:
        import torch

        return self.cfg.num_gpus > 0 and torch.cuda.is_available()

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the ranks' rendezvous (and a weight-transfer group): this node's bind address
        (loopback while every node is this machine) and a free port on it."""
        from pipeline.loop.remote import bind_address, free_port

        host = bind_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the data-parallel group (every rank at once) and build the model and DeepSpeed engine."""
        import torch

        if not self.on_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"  # must be set before deepspeed is imported
            torch.set_num_threads(max(1, math.ceil(self.cfg.num_cpus)))
        # DeepSpeed's CPU comm op: built at install time (`setup.sh`), in this environment's own folder.
        from learner.cpu_ops import use_extensions_dir

        use_extensions_dir()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
        import deepspeed

        self._join_ranks(master_addr, master_port)
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", auto_mpi_discovery=False)
        torch.manual_seed(self.cfg.seed)
        ds_config = self._ds_config()
        model = self._build_model(ds_config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = max(1, self.cfg.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        return self.version

    @property
    def source(self) -> PolicySource:
        """The weights as vLLM's `WeightSource` (built on first use: training and checkpoints need no vLLM)."""
        if self._source is None:
            from learner.weight_source import PolicySource

            self._source = PolicySource(self.engine.module, self.cfg.zero_stage)
        return self._source

    def _join_ranks(self, master_addr: str, master_port: int) -> None:
        """The ranks' process group (DeepSpeed takes it over), with its rendezvous store and its sockets on
        loopback when rank 0's address is loopback (every rank on this machine): torch's own rendezvous listens
        on every interface."""
        import datetime

        import torch.distributed as dist

        from pipeline.transport.weights import is_loopback, loopback_interface, tcp_store

        if dist.is_initialized():  # a second learner in one process (a benchmark) shares the group
            return
        if is_loopback(master_addr):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())
        store = tcp_store(master_addr, master_port, self.world_size, self.rank == 0, datetime.timedelta(minutes=30))
        dist.init_process_group("nccl" if self.on_gpu else "gloo", store=store, rank=self.rank,
                                world_size=self.world_size)

    @property
    def ds_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs. In bf16 it is at least 1: DeepSpeed 0.19's stage 0 can only accumulate
        gradients in the model's own precision (`_do_optimizer_sanity_check` refuses a bf16 model with float32
        accumulation), so a sum of many bf16 micro-gradients would round at every add. Stage 1 in bf16 is
        DeepSpeed's BF16_Optimizer: float32 gradient buffers, float32 masters and moments split over the ranks;
        the update is the same as stage 0's, the optimizer state per rank smaller."""
        return max(self.cfg.zero_stage, 1) if self.dtype == "bfloat16" else self.cfg.zero_stage

    def _ds_config(self) -> dict:
        cfg = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": cfg.micro_batch_size * self.grad_accum * self.world_size,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": self.ds_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        if self.dtype == "bfloat16":
            # Micro-gradients add up, and ranks reduce them, in float32 (DeepSpeed's default is the model's dtype).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
            config["communication_data_type"] = "fp32"
        return config

    def _build_model(self, ds_config: dict):
        import torch
        from transformers import AutoModelForCausalLM

        if self.cfg.zero_stage == 3:
            # While this object lives, transformers builds the model inside DeepSpeed's zero.Init: each rank
            # materialises only its own slice instead of loading the whole model first.
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_init = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def train_step(self, table: pa.Table) -> TrainStats:
        """One optimizer step on this rank's shard of the train table; returns the new version."""
        with self.cores.working():  # pipeline.cores = "phase": the node's idle cores too, refitted per micro-batch
            return self._train_step(table)

    def _train_step(self, table: pa.Table) -> TrainStats:
        import torch

        from learner.losses import combine_sums, mismatch_sums, ppo_loss
        from pipeline.data.batching import pack
        from pipeline.data.logprobs import model_logprobs

        start = time.perf_counter()
        maybe_fail_step(self.version + 1)
        assert table.num_rows == self.rows_per_rank * self.world_size, (table.num_rows, self.rows_per_rank)
        use_ref = self.cfg.kl_coef > 0
        # every rank sees the whole table, so all agree on the denominators below
        table, finite, nonfinite = _mask_nonfinite(table, ["behavior_logprobs"] + (["ref_logprobs"] if use_ref else []))
        global_tokens, global_rows = _valid_tokens(table), _valid_rows(table)
        shard = table.slice(self.rank * self.rows_per_rank, self.rows_per_rank)
        # DeepSpeed divides each micro-batch loss by grad_accum and averages over ranks; undo both so
        # the sum over all micro-batches and ranks is the token mean (probe term: row mean) over the global batch.
        denom = max(global_tokens, 1) / (self.grad_accum * self.world_size)
        row_denom = max(global_rows, 1) / (self.grad_accum * self.world_size)
        sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "probe": 0.0}
        corr = self.cfg.rollout_correction
        mismatch: list[dict[str, float]] = []
        shard_finite = finite[self.rank * self.rows_per_rank:(self.rank + 1) * self.rows_per_rank]
        local_tokens, local_rows, grad_norm = 0, 0, None
        self.engine.train()
        for m in range(self.grad_accum):
            self.cores.fit()
            mb = shard.slice(m * self.cfg.micro_batch_size, self.cfg.micro_batch_size)
            batch = pack(mb.column("prompt_ids").to_pylist(), mb.column("completion_ids").to_pylist(), self.pad_id)
            device = self.engine.device
            ids = batch.input_ids.to(device)
            with self._on_activations() as cap:  # the output head runs a chunk of positions at a time
                logp = model_logprobs(self.engine.module, ids, batch.attention_mask.to(device),
                                      forward=self.engine)  # (B, T-1)
            behavior = batch.completion_targets(mb.column("behavior_logprobs").to_pylist()).to(device)
            # The mismatch, from this very pass (every micro-step runs at the version the step trains): on every
            # completion token of a row with finite log-probs, whatever its advantage or shaping mask.
            measured = batch.completion_mask[:, 1:].to(device) & torch.as_tensor(
                shard_finite[m * self.cfg.micro_batch_size:][:mb.num_rows], device=device)[:, None]
            staleness = self.version - torch.tensor(mb.column("policy_version").to_pylist(), device=device)
            mismatch.append(mismatch_sums(logp, behavior, measured, staleness, corr.threshold, corr.low))
            ref = batch.completion_targets(mb.column("ref_logprobs").to_pylist()).to(device) if use_ref else None
            loss_mask = torch.as_tensor(mb.column("loss_mask").to_numpy(zero_copy_only=False), device=device)
            token_mask = batch.completion_mask[:, 1:].to(device) & loss_mask[:, None]
            adv = torch.tensor(mb.column("advantage").to_numpy(), dtype=torch.float32, device=device)
            parts = ppo_loss(logp, behavior, adv, token_mask, self.cfg.clip_eps, ref, self.cfg.kl_coef, num_tokens=denom,
                             correction=corr.mode, threshold=corr.threshold, low=corr.low)
            loss = parts.loss
            if cap is not None:  # shaping.kind = "loss": coef x the probe's score on this very pass
                from probes.probe import probe_loss

                probe_sum = probe_loss(self.probe, cap.residuals[self.probe.layer], batch.completion_mask.to(device),
                                       loss_mask)
                loss = loss + self.shaping.coef * probe_sum / row_denom
                sums["probe"] += float(probe_sum.detach())
            self.engine.backward(loss)
            if m == self.grad_accum - 1 and self.ds_stage == 0:
                grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 keeps whole grads; DeepSpeed reports none
            self.engine.step()
            # parts are normalised by `denom`; rescale to this rank's token mean for reporting
            local_tokens += int(parts.num_tokens)
            local_rows += int(loss_mask.sum())
            sums["loss"] += float(parts.loss.detach()) * denom
            sums["policy_loss"] += float(parts.policy_loss) * denom
            sums["kl"] += float(parts.kl) * denom
            sums["clip_frac"] += float(parts.clip_frac) * denom
        self.version += 1
        if self.ds_stage > 0:
            grad_norm = self.engine.get_global_grad_norm()
        mean = {k: v / max(local_tokens, 1) for k, v in sums.items() if k != "probe"}
        return TrainStats(
            self.version, mean["loss"], mean["policy_loss"], mean["kl"], mean["clip_frac"],
            float(grad_norm) if grad_norm is not None else math.nan, local_tokens, time.perf_counter() - start,
            sums["probe"] / local_rows if self.shaping is not None and self.shaping.kind == "loss" and local_rows
            else math.nan, local_rows, nonfinite, combine_sums(mismatch),
            self.cores.mean_threads if self.cores.cpu else 0.0,
        )

    def _on_activations(self):
        """The learner's forward pass as the shaping kind wants it: the probe's layer captured in the autograd graph
        (loss; yields the capture), or the probe's direction projected out there (ablate; yields None)."""
        import contextlib

        from probes.hooks import capture_residuals, edit_residual
        from probes.probe import project_out

        if self.shaping is None:
            return contextlib.nullcontext()
        module, layer = self.engine.module, self.probe.layer
        if self.shaping.kind == "loss":
            return capture_residuals(module, [layer], detach=False)

        @contextlib.contextmanager
        def ablated():
            with edit_residual(module, layer, lambda h: project_out(h, self.direction)):
                yield None

        return ablated()

    # --- weights out -------------------------------------------------------------------------------------

    def init_weight_transfer(self, client: Any, backend: str, bucket_bytes: int, timeout_s: float, name: str) -> None:
        """Build (or rebuild) the transfer group with the client's receivers: vLLM's trainer-side engine for
        `backend`. Every rank calls this; rank 0 hosts the group and returns once every receiver joined."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from pipeline.transport.vllm_weights import GLOO, GlooTrainerInitInfo, register

        register()
        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None
        address, port = self.address()
        world = 1 + client.num_ranks
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            from pipeline.transport.vllm_weights import bounded_nccl_trainer_engine

            info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world, packed=True,
                                       packed_buffer_size_bytes=bucket_bytes, rank=self.rank)
            self.transfer = bounded_nccl_trainer_engine().bounded_init(info, client=client, source=self.source,
                                                                       timeout_s=timeout_s)
            return
        if backend == "ipc":
            # Colocated on GPUs (pipeline.colocate): each engine opens CUDA IPC handles of this rank's packed
            # buffer on its own GPU and copies on the device. Packed, because a ZeRO-3 group's gathered tensors
            # live only until the next group is read; every rank joins the handles' all-gather, rank 0 sends.
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=self.rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
            self.transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=self.source)
            return
        if backend != GLOO:
            raise ValueError(f"no collective weight transfer for backend {backend!r}")
        info = GlooTrainerInitInfo(master_address=address, master_port=port, world_size=world, timeout_s=timeout_s,
                                   bucket_bytes=bucket_bytes, name=name, rank=self.rank)
        self.transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=self.source)

    def send_weights(self) -> SendStats:
        """Send the current weights to every receiver (every rank calls this; rank 0 sends). Returns SendStats."""
        from pipeline.transport.weights import SendStats

        if self.transfer is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        start = time.perf_counter()
        self.transfer.client.version = self.version
        self.transfer.send_weights()
        stats = getattr(self.transfer, "last", None)
        if stats is None or stats.version != self.version:  # an engine that keeps no statistics: bytes unknown
            stats = SendStats(self.version, num_bytes=None, max_gathered_bytes=self.source.max_gathered_bytes,
                              seconds=time.perf_counter() - start)
        stats.model_bytes = self.source.model_bytes
        return stats

    def get_weights(self) -> WireWeights | None:
        """The object-store transport: the whole model as `WireWeights` on rank 0 (None on other ranks).
        Every rank calls this (gathering is a collective under ZeRO-3)."""
        from pipeline.transport.weights import to_wire

        state = {}
        for names, tensors in self.source.iter_groups():
            if self.rank == 0:
                state.update((n, t.detach().to("cpu", copy=True)) for n, t in zip(names, tensors, strict=True))
        return to_wire(state, self.version) if self.rank == 0 else None

    # --- taking turns on a shared GPU (pipeline.colocate) ---------------------------------------------------

    OFFLOADED = ("optim_states", "hp_params", "lp_grads", "contiguous_grad_buffer")  # what moves; the weights stay

    def offload_states(self) -> float:
        """Move the optimizer state (Adam moments, fp32 masters, gradient buffers) to host memory, so the engine
        sharing this GPU has it while it generates; the low-precision weights stay (the next weight hand-off
        reads them). Seconds taken."""
        start = time.perf_counter()
        if self.ds_stage > 0:
            from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

            self.engine.offload_states(include=[OffloadStateTypeEnum(k) for k in self.OFFLOADED])
        else:
            _move_optimizer_state(self._base_optimizer(), "cpu")
        import torch

        torch.cuda.empty_cache()
        return time.perf_counter() - start

    def reload_states(self) -> float:
        """Bring what `offload_states` moved back to the GPU before the next step. Seconds taken."""
        start = time.perf_counter()
        if self.ds_stage > 0:
            self.engine.reload_states()
        else:
            _move_optimizer_state(self._base_optimizer(), f"cuda:{self.engine.device.index or 0}")
        return time.perf_counter() - start

    # --- checkpoints -------------------------------------------------------------------------------------

    @property
    def _fragments(self) -> bool:
        """ZeRO 1-3: DeepSpeed keeps fp32 masters and moments in flat partitions, read and written per parameter
        through `deepspeed.utils` (collectives under ZeRO-3); bf16 always (see `ds_stage`)."""
        return self.ds_stage > 0

    def _whole_masters(self) -> dict[int, object]:
        """ZeRO-0: id(parameter) -> the fp32 tensor Adam updates. That is the parameter itself in float32; in a
        lower precision, DeepSpeed's unfused mixed-precision wrapper keeps one fp32 copy per parameter."""
        opt = self.engine.optimizer
        if self.dtype == "float32":
            return {id(p): p for p in self.engine.module.parameters()}
        assert hasattr(opt, "fp32_groups") and isinstance(opt.fp32_groups[0], list), (
            f"ZeRO-0 in {self.dtype}: expected DeepSpeed's unfused mixed-precision optimizer, got {type(opt).__name__}")
        return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for lp, hp in zip(lps, hps, strict=True)}

    def _fp32_state(self, param, masters: dict | None) -> dict:
        """This parameter's whole fp32 optimizer state on the CPU: Adam's moments ({} before the first step) and,
        when the model trains in a lower precision, its master weights. A collective under ZeRO-3."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {}
        if self._fragments:
            values = {key: safe_get_full_optimizer_state(param, key) if self.version > 0 else None
                      for key in ("exp_avg", "exp_avg_sq")}
            values["master"] = safe_get_full_fp32_param(param) if self.dtype != "float32" else None
        else:
            hp = masters[id(param)]
            values = dict(self._base_optimizer().state.get(hp, {}))
            values = {key: values.get(key) for key in ("exp_avg", "exp_avg_sq")}
            values["master"] = hp if hp is not param else None
        for key, value in values.items():
            if value is not None:
                out[key] = value.detach().cpu()
        assert self.dtype == "float32" or "master" in out, "DeepSpeed kept no fp32 master for a low-precision weight"
        return out

    def _base_optimizer(self):
        """The torch optimizer that holds Adam's state (inside DeepSpeed's wrapper, if any)."""
        opt = self.engine.optimizer
        return opt.optimizer if self._fragments or self.dtype != "float32" else opt

    def _optimizer_step(self) -> int:
        """Adam's step count (steps skipped for a non-finite gradient norm do not count)."""
        steps = [float(st["step"]) for st in self._base_optimizer().state.values() if "step" in st]
        return int(max(steps, default=0))

    def save_checkpoint(self, directory: str) -> str | None:
        """Everything an exact resumption needs, in every precision: weights in the model's dtype (transformers
        layout, config and tokenizer beside them), and under `optimizer/` the fp32 master weights (when the model
        trains in a lower precision), Adam's moments, the RNG state; the optimizer and LR-schedule step counts in
        the state file. Every rank calls this (gathers are collectives under ZeRO), rank 0 writes. Returns the
        folder on rank 0."""
        import torch

        from learner import checkpoint as ck
        from learner.gather import iter_groups

        path, tmp = ck.begin(directory, self.version) if self.rank == 0 else (None, None)
        shard = int(self.cfg.checkpoint_shard_gib * 2**30)
        weights = ck.ShardWriter(tmp, ck.WEIGHTS_PREFIX, shard) if self.rank == 0 else None
        extra = ck.ShardWriter(tmp / ck.MOMENTS_DIR, ck.MOMENTS_PREFIX, shard) if self.rank == 0 else None
        masters = None if self._fragments else self._whole_masters()
        for names, group in iter_groups(self.engine.module, self.cfg.zero_stage == 3):
            for name, param in zip(names, group, strict=True):
                for key, value in self._fp32_state(param, masters).items():  # a collective under ZeRO-3
                    if extra is not None:
                        extra.add(f"{key}/{name}", value.float())
                if weights is not None:
                    weights.add(name, param.data)
        if self.rank != 0:
            return None
        extra.add(ck.RNG_CPU, torch.get_rng_state())
        if self.on_gpu:
            extra.add(ck.RNG_CUDA, torch.cuda.get_rng_state())
        weights.close()
        extra.close()
        ck.save_model_files(tmp, self.engine.module.config, self.model_path)
        return str(ck.commit(path, tmp, {"version": self.version, "zero_stage": self.cfg.zero_stage,
                                         "dtype": self.dtype, "optimizer_step": self._optimizer_step(),
                                         "lr_step": int(self.engine.lr_scheduler.last_epoch)}))

    def load_checkpoint(self, path: str) -> int:
        """Restore what `save_checkpoint` wrote: weights, fp32 masters, Adam moments and step, LR schedule, RNG.
        Every rank. A checkpoint without masters (written in float32, or by an older version) restores the masters
        from the weights."""
        import torch
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from learner import checkpoint as ck

        if self.version != 0:
            raise RuntimeError(f"load_checkpoint needs a freshly set-up learner (this one is at version {self.version})")
        ckpt = ck.CheckpointReader(path)
        if ckpt.has_moments and self._fragments:
            self._create_optimizer_state()
        masters = None if self._fragments else self._whole_masters()
        params = dict(self.engine.module.named_parameters())
        missing = sorted(set(params) - ckpt.weight_names)
        if missing:
            raise ValueError(f"checkpoint {path} lacks weights for {missing[:3]}: it belongs to another model")
        step = torch.tensor(float(ckpt.state.get("optimizer_step", ckpt.version)))
        for name, p in params.items():
            w = ckpt.weight(name).to(p.dtype)
            if self.cfg.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                    if self.rank == 0:
                        p.copy_(w)
            else:
                with torch.no_grad():
                    p.copy_(w)
            master = ckpt.moment("master", name)
            master = master if master is not None else w.float()  # float32 (or older) checkpoints keep none
            if self._fragments:
                safe_set_full_fp32_param(p, master)
            else:
                hp = masters[id(p)]
                if hp is not p:  # float32: the parameter is its own master, written just above
                    with torch.no_grad():
                        hp.copy_(master)
            for key in ("exp_avg", "exp_avg_sq"):
                m = ckpt.moment(key, name)
                if m is None:
                    continue
                if self._fragments:
                    safe_set_full_optimizer_state(p, m, key)
                else:
                    st = self._base_optimizer().state[hp]
                    st[key] = m.clone().to(hp.device)
                    st["step"] = step.clone()
        if self._fragments and ckpt.has_moments:
            for st in self._base_optimizer().state.values():
                st["step"] = step.clone()
        for _ in range(int(ckpt.state.get("lr_step", ckpt.version))):  # the LR schedule resumes where it was
            self.engine.lr_scheduler.step()
        rng = ckpt.moment(*ck.RNG_CPU.split("/", 1))
        if rng is not None:
            torch.set_rng_state(rng)
        rng_cuda = ckpt.moment(*ck.RNG_CUDA.split("/", 1))
        if rng_cuda is not None and self.on_gpu:
            torch.cuda.set_rng_state(rng_cuda)
        self.version = ckpt.version
        return self.version

    def _create_optimizer_state(self) -> None:
        """DeepSpeed's ZeRO optimizers create Adam's state at the first step; a restored learner needs it now, to
        write the checkpoint's moments into. Zeros, overwritten by the checkpoint, then (ZeRO-1/2) linked to each
        parameter's fragment as DeepSpeed links them at the first step."""
        import torch

        wrapper = self.engine.optimizer
        base = wrapper.optimizer
        # ZeRO-3 puts each flat fp32 partition into the inner optimizer's groups only while it steps
        flats = (getattr(wrapper, "fp32_partitioned_groups_flat", None)
                 or [p for g in base.param_groups for p in g["params"]])
        for p in flats:
            if not base.state.get(p):
                base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-3 finds its state by parameter
            wrapper._lazy_init_hp_params_optimizer_state()

    def ready(self) -> int:
        return self.version

    def memory_knobs(self) -> dict:
        """What the learner's memory settings did to the model it trains (for checks and logs)."""
        return {"gradient_checkpointing": bool(getattr(self.engine.module, "is_gradient_checkpointing", False)),
                "zero_stage": self.cfg.zero_stage}

    def pid(self) -> int:
        return os.getpid()


def _move_optimizer_state(optimizer, device: str) -> int:
    """Move a torch optimizer's state tensors (Adam's moments; its step counts stay where torch keeps them) to
    `device`, in place; bytes moved."""
    moved = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and hasattr(value, "to") and value.device.type != device.split(":")[0]:
                state[key] = value.to(device, non_blocking=False)
                moved += value.numel() * value.element_size()
    return moved


def _grad_norm(module) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _mask_nonfinite(table: pa.Table, columns: list[str]) -> tuple[pa.Table, np.ndarray, int]:
    """A row with a non-finite value in one of `columns` (log-probs) gets no gradient: the table with such rows
    masked out of `loss_mask`, which rows are finite, and how many of the rows that would have counted were
    masked."""
    from pipeline.data.batching import finite_rows

    finite = finite_rows(table, columns)
    rows = table.column("loss_mask").to_numpy(zero_copy_only=False)
    nonfinite = int((rows & ~finite).sum())
    if nonfinite:
        field = table.schema.get_field_index("loss_mask")
        table = table.set_column(field, table.schema.field(field), pa.array(rows & finite, pa.bool_()))
    return table, finite, nonfinite


def _valid_rows(table: pa.Table) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(table.column("loss_mask").cast(pa.int64())).as_py() or 0)


def _valid_tokens(table: pa.Table) -> int:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.column("completion_ids"))
    return int(pc.sum(pc.if_else(table.column("loss_mask"), lengths, 0)).as_py() or 0)
