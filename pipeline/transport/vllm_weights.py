"""probe-rl's backends for vLLM's weight-transfer protocol, registered as a vLLM plugin.

vLLM 0.32 receives RL weight updates through `LLM.init_weight_transfer_engine`, `start_weight_update`,
`update_weights` and `finish_weight_update`, dispatched to a per-worker engine chosen by
`WeightTransferConfig.backend`. On GPUs probe-rl uses vLLM's own `nccl` engines. For CPU it registers:

- `probe_rl_gloo`: the same packed, bucketed broadcast from learner rank 0 over a gloo group, worker side
  (`GlooWorkerEngine`) and trainer side (`GlooTrainerEngine`), so a CPU run exercises the code path a GPU
  cluster runs: the trainer drives the handshake through a client, the receiving worker lives wherever
  vLLM put it (in the actor's process, or in vLLM's separate engine process).
- `probe_rl_inline`: the object-store fallback. The generator actor receives a `WireWeights` from Ray's
  object store and hands its tensors' bytes to `update_weights` in bounded chunks; vLLM's msgpack carries
  them into the engine process as bytes, never pickled.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (pyproject.toml names
`register` here), so the engine process finds these backends too.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from pipeline.transport.weights import (
    BACKEND_GLOO,
    BACKEND_INLINE,
    GroupSpec,
    SendStats,
    TransferError,
    UpdateInfo,
    Watchdog,
    dtype_name,
    open_group,
    receive_buckets,
    start_broadcast,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig, WeightTransferConfig

GLOO, INLINE = BACKEND_GLOO, BACKEND_INLINE


def allow_amx() -> bool:
    """Ask Linux for this process's permission to use AMX tiles (arch_prctl ARCH_REQ_XCOMP_PERM, through torch's
    `init_amx`); True where the CPU has AMX and the kernel granted it, False elsewhere (nothing to do).

    Why: on a CPU with AMX, vLLM's CPU attention takes its AMX kernel for bf16 (`cpu_attn.py: _get_attn_isa`), and
    that kernel loads a tile configuration without asking for the permission Linux requires of a process before
    its first AMX instruction: without it the instruction traps (SIGILL, "Illegal instruction" in
    `cpu_attention::AttentionMainLoop`). oneDNN asks for it when one of its bf16 matmuls dispatches to AMX, which a
    prompt of 5 or more tokens triggers in the QKV projection before attention runs; a first prompt of 1-4 tokens
    reaches attention first and kills the engine. The permission is per process (its threads included), so every
    process that runs a vLLM worker asks for it: this function runs from the plugin vLLM loads in each of them."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())


def register() -> None:
    """vLLM plugin entry point: make both backends known to vLLM's factories in this process, and probe-rl's
    model loader (generator-read probes) to vLLM's loader registry; on CPUs with AMX, allow this process to use
    it (`allow_amx`); for generators whose weights land mid-generation, keep vLLM's linear layers off its oneDNN
    handlers (`linear_without_onednn`)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from pipeline.transport.vllm_probes import register_loader

    register_loader()  # load_format "probe_rl": probes read in the sampling pass (pipeline/transport/vllm_probes.py)
    allow_amx()
    linear_without_onednn()

    for name, cls in ((GLOO, "GlooWorkerEngine"), (INLINE, "InlineWorkerEngine")):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, __name__, cls)
    if GLOO not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO, __name__, "GlooTrainerEngine")
    # vLLM's own NCCL receiver, made to close the communicator of a group it leaves (`closing_nccl_worker_engine`)
    WeightTransferEngineFactory._registry["nccl"] = closing_nccl_worker_engine
    WeightTransferEngineFactory._registry["ipc"] = tied_ipc_worker_engine  # colocated on GPUs: CUDA IPC, in place


NO_ONEDNN_ENV = "PROBE_RL_LINEAR_WITHOUT_ONEDNN"  # set by a generator whose weights land mid-generation


def linear_without_onednn() -> None:
    """Where `PROBE_RL_LINEAR_WITHOUT_ONEDNN` is set (actors/generator.py sets it, before its engine starts, for
    update_mode in_flight and continuous; vLLM's engine and worker processes inherit it): on CPUs, vLLM computes an unquantized linear layer through a oneDNN matmul handler made from its weight
    (`dispatch_cpu_unquantized_gemm`) unless `vllm._custom_ops._supports_onednn` is false; this makes it false, so
    those layers run `torch.nn.functional.linear` on the weight itself (AMX's packed bf16 kernels, chosen before
    oneDNN, are unaffected).

    Why: on a host without AVX-512 (AVX2 only), once a weight update was processed on another thread than the one
    that generates (updates that land mid-generation come on the actor's weights thread: update_mode in_flight
    and continuous), the handlers vLLM rebuilds went on computing with the *old* weights for every batch shape
    the engine had run before the update: every later token's log-prob was off by up to 1.8 nats, and the
    generator sampled from weights the learner no longer had (tests/integration/test_in_flight.py; the same tests
    passed on an AVX-512 host, and updates on the generating thread, between steps, were right on both). The torch
    path reads the weight tensor as it is at each call; on the SmolLM2 shapes it took 0.9-1.3x oneDNN's time on
    one thread of that host, the output head at 32 rows the slowest (`python benchmarks/bench_cpu_linear.py`).
    Between steps the handlers stay: their results do not change with the thread count, which the colocated run's
    step-for-step equality with the synchronous run rests on (torch's do, on that host)."""
    if os.environ.get(NO_ONEDNN_ENV) != "1":
        return
    import vllm._custom_ops as ops

    ops._supports_onednn = False


_CLOSING_NCCL: type | None = None


def closing_nccl_worker_engine() -> type:
    """vLLM's NCCL worker engine, except that joining a new transfer group first destroys the communicator of
    the old one. The fleet rebuilds the group whenever a receiver is replaced (an NCCL group admits no new
    member); vLLM's `init_transfer_engine` overwrites `model_update_group` without destroying it, so every
    surviving receiver would keep one open communicator (its NCCL buffers and sockets) per rebuild."""
    global _CLOSING_NCCL
    if _CLOSING_NCCL is None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        class ClosingNcclWorkerEngine(NCCLWeightTransferEngine):
            def init_transfer_engine(self, init_info) -> None:
                self.shutdown()  # destroys the old communicator, if any
                super().init_transfer_engine(init_info)

            def finish_weight_update(self) -> None:
                super().finish_weight_update()
                refresh_tied_heads(self.model)  # a tied output head's processed copy (see refresh_tied_heads)

        _CLOSING_NCCL = ClosingNcclWorkerEngine
    return _CLOSING_NCCL


_TIED_IPC: type | None = None


def tied_ipc_worker_engine() -> type:
    """vLLM's CUDA IPC worker engine (a learner rank and this engine share one GPU: pipeline.colocate), with the
    tied output head refreshed after each update as the other receivers do (see `refresh_tied_heads`)."""
    global _TIED_IPC
    if _TIED_IPC is None:
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        class TiedIpcWorkerEngine(IPCWeightTransferEngine):
            def finish_weight_update(self) -> None:
                super().finish_weight_update()
                refresh_tied_heads(self.model)

        _TIED_IPC = TiedIpcWorkerEngine
    return _TIED_IPC


# --- worker side (inside vLLM's workers) -------------------------------------------------------------------


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int  # transfer-group rank of this engine's first worker (the sender is rank 0)
    timeout_s: float
    name: str


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo, UpdateInfo):
    pass


def refresh_tied_heads(model: torch.nn.Module) -> int:
    """After a layerwise reload: re-run the weight processing of every unquantized embedding-like module whose
    weight is shared with another module (a tied output head, `tie_word_embeddings`); the number refreshed.

    Why: a tied model's checkpoint holds the embedding only (vLLM's loader skips `lm_head.*`), so the reload
    processes the input embedding and leaves the output head alone: it puts the head's own tensors back, which
    share the embedding's storage and so hold the new values, but on CPU the head also holds what its processing
    made of the old ones (`dispatch_cpu_unquantized_gemm`: a oneDNN or packed copy of the weight, which is what
    computes the logits), so the head would keep producing the old model's logits. Re-running the processing
    rebuilds that copy from the shared weight; on GPU the unquantized method has nothing to rebuild."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(getattr(module, "quant_method", None),
                                                         UnquantizedEmbeddingMethod):
            owners.setdefault(id(weight), []).append(module)
    refreshed = 0
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


class _ReloadingEngine(WeightTransferEngine):
    """Checkpoint-format weights land through vLLM's layerwise reload, as in vLLM's own NCCL engine. An update
    aborted halfway (its sender died) leaves layers waiting for weights; the next update finalizes that one
    first, so a full resend always leaves the model whole."""

    _active = False

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._active:
            self.finish_weight_update()
        initialize_layerwise_reload(self.model)
        self._active = True

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_heads(self.model)
        self._active = False

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # the base class synchronizes unconditionally, which fails on CPU
            torch.accelerator.synchronize()


class GlooWorkerEngine(_ReloadingEngine):
    """Receives learner rank 0's bucketed broadcast over gloo (the CPU twin of vLLM's NCCL engine)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config: WeightTransferConfig, vllm_config: VllmConfig, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def _worker_rank(self) -> int:
        p = self.parallel_config
        return p.data_parallel_index * p.world_size + p.rank

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()  # a rebuilt group (a member was replaced) supersedes the old one
        spec = GroupSpec(init_info.master_address, init_info.master_port, init_info.world_size,
                         init_info.timeout_s, init_info.name)
        rank = init_info.rank_offset + self._worker_rank()
        self.group = open_group(spec, rank, f"vLLM worker (transfer rank {rank})")

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise TransferError("update_weights before init_weight_transfer_engine")
        receive_buckets(self.group, update_info, self.model.load_weights, self.device,
                        f"vLLM worker {self._worker_rank()}")

    def shutdown(self) -> None:
        self.group = None


@dataclass
class InlineInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class InlineUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    data: list[bytes]  # each tensor's raw bytes: msgpack carries bytes into vLLM's engine process as they are


class InlineWorkerEngine(_ReloadingEngine):
    """Loads tensors handed over in the update call itself (the object-store transport's last hop)."""

    init_info_cls = InlineInitInfo
    update_info_cls = InlineUpdateInfo

    def init_transfer_engine(self, init_info: InlineInitInfo) -> None:
        pass

    def receive_weights(self, update_info: InlineUpdateInfo) -> None:
        info = update_info
        self.model.load_weights([
            (name, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dt)).view(shape))
            for name, dt, shape, data in zip(info.names, info.dtype_names, info.shapes, info.data, strict=True)])

    def shutdown(self) -> None:
        pass


# --- trainer side (inside learner rank processes) ----------------------------------------------------------


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int  # 1 (the sender) + every receiving worker
    timeout_s: float
    bucket_bytes: int
    name: str


class GlooTrainerEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Learner rank 0 sends; every rank walks the source in step, since gathering a ZeRO-3 layer group is a
    collective. The handshake goes through the client (start, update in a thread beside the broadcast,
    finish), exactly as vLLM's NCCL trainer engine drives it."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: Any, source: WeightSource | None, is_sender: bool, init_info: GlooTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = init_info
        self.group = None
        self.last = SendStats(0)

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: WeightSource | None = None) -> GlooTrainerEngine:
        if source is None:
            raise ValueError("the gloo trainer engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                       "world_size": init_info.world_size, "timeout_s": init_info.timeout_s, "name": init_info.name}
        # Receivers block in the rendezvous until every member arrives, so they join from a side thread while
        # this rank hosts the store; a member that never arrives fails both sides within the timeout.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, worker_info)
            try:
                engine.group = open_group(GroupSpec(init_info.master_address, init_info.master_port,
                                                    init_info.world_size, init_info.timeout_s, init_info.name),
                                          0, "learner rank 0 (weights sender)")
            finally:
                joined.result()  # a receiver's own error (dead, refused) names it; raise that one first
        return engine

    def send_weights(self) -> None:
        source, start = self.source, time.perf_counter()
        meta = source.metadata()
        stats = SendStats(getattr(self.client, "version", 0), model_bytes=sum(
            m.dtype.itemsize * int(torch.Size(m.shape).numel()) for m in meta))
        if not self.is_sender:
            for _ in source.iter_groups():  # keep step with rank 0's gathers; send nothing
                pass
        else:
            info = UpdateInfo([m.name for m in meta], [dtype_name(m.dtype) for m in meta],
                              [list(m.shape) for m in meta], self.info.bucket_bytes, stats.version)
            self.client.start_weight_update()
            # The receivers' update_weights runs beside the broadcast. Never wait for that thread after a failed
            # broadcast: a frozen receiver would hold this rank for the client's whole call timeout, and the
            # sync must fail within weights.timeout_s, naming the receiver.
            pool = ThreadPoolExecutor(max_workers=1)
            received = pool.submit(self.client.update_weights, asdict(info))
            try:
                self._broadcast(source, info, stats)
                # Each receiver loads a bucket as it arrives, so once the last one is sent every receiver is
                # at most one bucket's load from done: one that is not within the timeout is frozen.
                received.result(timeout=self.info.timeout_s)
            except TransferError:
                if received.done():
                    received.result()  # the receiver's error says more than "connection closed"
                raise
            except FuturesTimeout:
                silent = getattr(self.client, "unfinished", lambda: ["a receiver"])()
                raise TransferError(f"{', '.join(silent)} did not finish receiving weights version {info.version} "
                                    f"within {self.info.timeout_s:.0f}s of its last bucket (weights.timeout_s): "
                                    "stopped or hung") from None
            finally:
                pool.shutdown(wait=False)
            self.client.finish_weight_update()
        stats.max_gathered_bytes = getattr(source, "max_gathered_bytes", 0)
        stats.seconds = time.perf_counter() - start
        self.last = stats

    def _broadcast(self, source: WeightSource, info: UpdateInfo, stats: SendStats) -> None:
        """Copy the source's tensors into buckets along the shared plan and send each once it is full, packing
        the next while the last is on the wire (at most two buckets held).

        Each tensor is copied once, into its bucket, so a gathered ZeRO-3 layer may be released as soon as
        its group has been walked. When a send fails, the walk still runs to the end without sending: the
        other learner ranks are waiting in the same gathers, and leaving them there would hang them."""
        sizes, plan = info.sizes(), info.buckets()
        bucket_of = {i: b for b, indices in enumerate(plan) for i in indices}
        buffer, offset, index, failed, in_flight = None, 0, 0, None, None
        for names, tensors in source.iter_groups():
            for name, tensor in zip(names, tensors, strict=True):
                if index >= len(info.names) or name != info.names[index]:
                    raise RuntimeError(f"weight source yielded {name!r} out of its metadata's order")
                b = bucket_of[index]
                index += 1
                if failed is not None:
                    continue
                if buffer is None:
                    buffer = torch.empty(sum(sizes[i] for i in plan[b]), dtype=torch.uint8)
                size = sizes[index - 1]
                buffer[offset : offset + size].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
                offset += size
                if index == len(info.names) or bucket_of[index] != b:
                    try:
                        if in_flight is not None:
                            in_flight()
                        in_flight = start_broadcast(self.group, buffer, f"learner rank 0: bucket {b} of weights "
                                                    f"version {info.version}")
                        stats.num_bytes += buffer.numel()
                        stats.num_buckets += 1
                    except TransferError as e:
                        failed, in_flight = e, None
                    buffer, offset = None, 0
        try:
            if in_flight is not None:
                in_flight()
        except TransferError as e:
            failed = failed or e
        if failed is not None:
            raise failed
        if index != len(info.names):
            raise RuntimeError(f"weight source yielded {index} tensors, its metadata {len(info.names)}")

    def shutdown(self) -> None:
        self.group = None


def bounded_nccl_trainer_engine() -> type:
    """vLLM's NCCL trainer engine with the bounds the gloo engine has: the rendezvous and every broadcast fail
    within weights.timeout_s of their last progress, naming the weights version, instead of blocking forever
    in an NCCL call or a stream sync (`Watchdog`). Built on first use: vLLM's NCCL module needs a GPU build."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    class BoundedNcclTrainerEngine(NCCLTrainerWeightTransferEngine):
        timeout_s: float = 120.0

        @classmethod
        def bounded_init(cls, init_info, *, client, source, timeout_s: float):
            # The receivers first finish what they are doing (bounded by the client's call timeout); the
            # rendezvous after that is bounded by weights.timeout_s.
            if init_info.is_sender:
                client.prepare()
            engine = Watchdog(timeout_s, "the NCCL weight transfer group's rendezvous").run(
                lambda: cls.trainer_init(init_info, client=client, source=source))
            engine.timeout_s = timeout_s
            return engine

        def send_weights(self) -> None:
            version = getattr(self.client, "version", 0)
            start, inner = time.perf_counter(), self.source
            if not self.is_sender:
                # A rank that sends nothing only keeps step with rank 0's gathers (collectives of the learner
                # ranks, bounded by their process group's own timeout). It is not watched: while rank 0 waits
                # for the receivers to finish a generation, these ranks wait in their first gather, and that
                # is no fault.
                super().send_weights()
                self.last = SendStats(version, max_gathered_bytes=getattr(inner, "max_gathered_bytes", 0),
                                      seconds=time.perf_counter() - start)
                return
            # Waiting for receivers that are busy (a generation in flight finishes first) is bounded by the
            # client's call timeout and its health pings, not by weights.timeout_s: that bounds the transfer.
            self.client.start_weight_update()
            dog = Watchdog(self.timeout_s, f"NCCL broadcast of weights version {version}")
            source, client = _Ticking(inner, dog), self.client
            self.source, self.client = source, _Started(client)
            try:
                dog.run(super().send_weights)
            finally:
                self.source, self.client = inner, client
            # What this rank handed to the broadcast (vLLM's engine keeps no statistics of its own).
            self.last = SendStats(version, num_bytes=source.num_bytes,
                                  max_gathered_bytes=getattr(inner, "max_gathered_bytes", 0),
                                  seconds=time.perf_counter() - start)

    return BoundedNcclTrainerEngine


class _Started:
    """A weight-sync client whose `start_weight_update` already ran (outside the transfer's watchdog); every
    other call goes to the client itself."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def start_weight_update(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Ticking(WeightSource):
    """A weight source that reports each tensor it yields to a watchdog (a broadcast that stops taking tensors is
    stuck)."""

    def __init__(self, inner: WeightSource, dog: Watchdog) -> None:
        self.inner, self.dog = inner, dog
        self.num_bytes = 0  # of the tensors yielded

    def metadata(self):
        return self.inner.metadata()

    def groups(self):
        return self.inner.groups()

    def iter_groups(self):
        for names, tensors in self.inner.iter_groups():
            self.dog.tick()
            self.num_bytes += sum(t.numel() * t.element_size() for t in tensors)
            yield names, tensors

    def __iter__(self):
        for name, tensor in self.inner:
            self.dog.tick()
            self.num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

