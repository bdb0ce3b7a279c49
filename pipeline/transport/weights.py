"""The weight path from the learner to generators (and live scorers): buckets, transfer groups, wire formats.

Two transports carry every weight version (config `weights.transport`):

- **collective**: learner rank 0 broadcasts the weights bucket by bucket to every receiver in one process
  group. On GPUs that is vLLM's own `nccl` engine pair; on CPU it is the gloo engine pair of
  `pipeline/transport/vllm_weights.py`, which speaks the same protocol (`init_weight_transfer_engine`,
  `start_weight_update`, `update_weights`, `finish_weight_update`). Nothing passes through the driver or
  the object store, and no rank holds more than one bucket plus one gathered layer group at a time.
- **object_store**: learner rank 0 gathers the whole state dict to host memory, the driver puts it in
  Ray's object store once, and every receiver loads it from there (`WireWeights`): the fallback, and the
  baseline the benchmark compares against.

This module holds what both ends of the gloo transport share and needs no vLLM: the bucket plan (both
ends derive it from the same metadata, so bucket boundaries always agree), packing, a process group that
cannot hang (every rendezvous and collective has a timeout), and a receiver that loads buckets into a
plain transformers model (the live scorer's copy).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config import BACKEND_GLOO, BACKEND_INLINE  # noqa: F401  (re-exported: the transport's names)
from pipeline.faults import maybe_slow_down

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup, Store, TCPStore


class TransferError(RuntimeError):
    """A weight transfer failed: a peer died, never joined, or stayed silent past the timeout."""


class Watchdog:
    """Runs a call that can block without a timeout of its own (an NCCL rendezvous, a broadcast that waits on
    its stream) on a thread, and turns "no progress for `timeout_s`" into a TransferError naming `what`.

    The call reports progress with `tick()` (each tensor handed to the broadcast, say). A stuck call's thread
    is left behind: nothing can interrupt a blocked collective, and the group is unusable afterwards anyway;
    the caller tears it down and builds a new one."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.timeout_s, self.what = timeout_s, what
        self.last = time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()

    def run(self, fn: Callable[[], object]) -> object:
        import threading

        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread below)
                box["error"] = e

        thread = threading.Thread(target=target, name=f"watchdog: {self.what}", daemon=True)
        self.tick()
        thread.start()
        while thread.is_alive():
            thread.join(timeout=min(1.0, self.timeout_s / 4))
            if thread.is_alive() and time.monotonic() - self.last > self.timeout_s:
                raise TransferError(f"{self.what}: no progress for {self.timeout_s:.0f}s (weights.timeout_s): a "
                                    "peer is stuck or gone")
        if "error" in box:
            raise box["error"]
        return box.get("value")


# --- object store ------------------------------------------------------------------------------------------


@dataclass
class WireWeights:
    """A state dict as numpy arrays, so Ray's object store moves it without copies (torch tensors are
    pickled byte by byte; `bench_weight_sync.py` measures the difference). bfloat16 has no numpy dtype,
    so it travels as int16 bits with its dtype named alongside."""

    version: int
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]  # name -> torch dtype name

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def to_wire(state: dict[str, torch.Tensor], version: int) -> WireWeights:
    arrays, dtypes = {}, {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        dtypes[name] = dtype_name(t.dtype)
        arrays[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return WireWeights(version, arrays, dtypes)


def from_wire(wire: WireWeights | dict) -> dict[str, torch.Tensor]:
    """Tensors that share memory with the arrays (read-only object-store memory: copy before writing)."""
    if isinstance(wire, dict):  # already a state dict (tests, in-process use)
        return wire
    out = {}
    for name, a in wire.arrays.items():
        t = torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(a.copy())
        out[name] = t.view(torch.bfloat16) if wire.dtypes[name] == "bfloat16" else t
    return out


# --- buckets -----------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes_of(shape: Iterable[int], dtype: str) -> int:
    return int(np.prod(list(shape), dtype=np.int64)) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices grouped so a bucket holds at most `bucket_bytes` (a larger tensor travels
    alone). Sender and receivers both call this on the same sizes, so their bucket boundaries agree."""
    buckets: list[list[int]] = []
    current: list[int] = []
    held = 0
    for i, size in enumerate(sizes):
        if current and held + size > bucket_bytes:
            buckets.append(current)
            current, held = [], 0
        current.append(i)
        held += size
    if current:
        buckets.append(current)
    return buckets


@dataclass
class UpdateInfo:
    """One weight version's metadata, sent to every receiver before the bytes (plain lists: it crosses
    Ray and vLLM's engine-process boundary as msgpack)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    version: int = 0  # for error messages; vLLM keeps the served version itself

    def sizes(self) -> list[int]:
        return [nbytes_of(s, d) for s, d in zip(self.shapes, self.dtype_names, strict=True)]

    def buckets(self) -> list[list[int]]:
        return plan_buckets(self.sizes(), self.bucket_bytes)


def unpack(buffer: torch.Tensor, info: UpdateInfo, indices: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Views of `buffer` as the named tensors `indices` of `info`."""
    sizes = [nbytes_of(info.shapes[i], info.dtype_names[i]) for i in indices]
    parts = buffer.split(sizes)
    return [(info.names[i], part.view(getattr(torch, info.dtype_names[i])).view(info.shapes[i]))
            for i, part in zip(indices, parts, strict=True)]


# --- a gloo group that cannot hang -------------------------------------------------------------------------


@dataclass
class GroupSpec:
    """Where and how a transfer group meets: rank 0 (the sender) hosts the store at master_address:port."""

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float
    name: str = "probe-rl-weights"  # unique per incarnation of the group (it is rebuilt when members change)


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost")


def loopback_interface() -> str:
    """The name of this machine's loopback interface ("lo" on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.startswith("127.") for a in addrs):
            return name
    return "lo"


def tcp_store(host: str, port: int, world_size: int, is_host: bool, timeout: datetime.timedelta) -> TCPStore:
    """A torch.distributed TCPStore whose host (rank 0) listens on `host`'s interface alone: torch's own server
    listens on every interface, so the listening socket is made here and handed over."""
    import socket

    from torch.distributed import TCPStore

    if not is_host:
        return TCPStore(host, port, world_size, False, timeout=timeout)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    # the store's server takes the socket over (and closes it with the store)
    return TCPStore(host, port, world_size, True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=listener.detach())


def gloo_group(store: Store, rank: int, size: int, timeout: datetime.timedelta, host: str) -> ProcessGroup:
    """A gloo process group whose sockets bind to loopback when the group's host is loopback (every member on
    this machine), else to this machine's address as gloo resolves it."""
    from torch.distributed import ProcessGroupGloo

    if not is_loopback(host):
        return ProcessGroupGloo(store, rank, size, timeout)
    opts = ProcessGroupGloo._Options()
    opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timeout
    return ProcessGroupGloo(store, rank, size, opts)


def open_group(spec: GroupSpec, rank: int, role: str) -> ProcessGroup:
    """Join (rank 0: host) the gloo transfer group. A member that does not arrive within the timeout makes
    every other member fail with a TransferError instead of waiting forever."""
    from torch.distributed import PrefixStore

    timeout = datetime.timedelta(seconds=spec.timeout_s)
    try:
        store = tcp_store(spec.master_address, spec.master_port, spec.world_size, rank == 0, timeout)
        return gloo_group(PrefixStore(spec.name, store), rank, spec.world_size, timeout, spec.master_address)
    except (RuntimeError, TimeoutError) as e:  # DistStoreError and gloo's connect errors are RuntimeErrors
        raise TransferError(
            f"{role}: the weight transfer group {spec.name} ({spec.world_size} members at {spec.master_address}:"
            f"{spec.master_port}) did not assemble within {spec.timeout_s:.0f}s (weights.timeout_s): a member "
            f"never joined ({str(e).splitlines()[0]})") from None


def broadcast(group: ProcessGroup, buffer: torch.Tensor, what: str) -> None:
    """Broadcast `buffer` from rank 0 of `group` (send on rank 0, receive elsewhere); bounded by the
    group's timeout, so a dead or silent peer raises a TransferError naming `what`."""
    start_broadcast(group, buffer, what)()


def start_broadcast(group: ProcessGroup, buffer: torch.Tensor, what: str) -> Callable[[], None]:
    """Post a broadcast and return a function that waits for it (raising a TransferError naming `what`), so
    the caller can pack or load another bucket while this one is on the wire."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    try:
        work = group.broadcast([buffer], opts)
    except RuntimeError as e:
        raise TransferError(f"{what}: {str(e).splitlines()[0]}") from None

    def done() -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise TransferError(f"{what}: {str(e).splitlines()[0]}") from None

    return done


@dataclass
class ReceiveStats:
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0


def receive_buckets(group: ProcessGroup, info: UpdateInfo, load: Callable[[list[tuple[str, torch.Tensor]]], object],
                    device: str | torch.device = "cpu", what: str = "receiver") -> ReceiveStats:
    """Receive one version bucket by bucket and hand each bucket's tensors to `load`, receiving the next bucket
    while loading this one (at most two buckets held).

    Every bucket gets a fresh buffer: vLLM's layerwise reload keeps the tensors it is handed until a whole
    layer has arrived, so a reused buffer would be overwritten under it.
    """
    stats, start = ReceiveStats(), time.perf_counter()
    sizes, plan = info.sizes(), info.buckets()

    def post(b: int):
        buffer = torch.empty(sum(sizes[i] for i in plan[b]), dtype=torch.uint8, device=device)
        return buffer, start_broadcast(group, buffer, f"{what}: bucket {b} of weights version {info.version}")

    pending = post(0) if plan else None
    for b, indices in enumerate(plan):
        buffer, done = pending
        done()
        pending = post(b + 1) if b + 1 < len(plan) else None
        load(unpack(buffer, info, indices))
        maybe_slow_down("receiver")  # tests: a transfer long enough to fault a receiver between buckets
        stats.num_bytes += buffer.numel()
        stats.num_buckets += 1
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class SendStats:
    """What one learner rank did for one weight version."""

    version: int
    num_bytes: int | None = 0  # bytes this rank sent (0 on every rank but the sender; None: not measured)
    num_buckets: int = 0
    max_gathered_bytes: int = 0  # most parameter bytes this rank held gathered at once for the sync
    model_bytes: int = 0  # the whole model, for comparison
    seconds: float = 0.0
    receivers: list[str] = field(default_factory=list)


class ModelReceiver:
    """The receiving end of the gloo transport for a plain transformers model (a live scorer's copy):
    the same four calls vLLM's engines answer, loading each bucket with an in-place copy."""

    def __init__(self, model: torch.nn.Module, role: str) -> None:
        self.model, self.role = model, role
        self.group = None
        self.rank = 0
        self.version = 0

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        spec = GroupSpec(init_info["master_address"], init_info["master_port"], init_info["world_size"],
                         init_info["timeout_s"], init_info["name"])
        self.group = None  # a member joins one incarnation at a time
        self.group = open_group(spec, init_info["rank_offset"], self.role)

    def start_weight_update(self) -> None:
        if self.group is None:
            raise TransferError(f"{self.role}: start_weight_update before init_weight_transfer_engine")

    def update_weights(self, update_info: dict) -> ReceiveStats:
        info = UpdateInfo(**update_info)
        params = dict(self.model.named_parameters())
        unknown = [n for n in info.names if n not in params]
        if unknown:
            raise TransferError(f"{self.role}: weights version {info.version} names unknown parameters {unknown[:3]}")

        def load(pairs):
            with torch.no_grad():
                for name, tensor in pairs:
                    params[name].copy_(tensor)

        device = next(self.model.parameters()).device
        return receive_buckets(self.group, info, load, device, self.role)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        if weight_version is not None:
            self.version = int(weight_version)

    def shutdown(self) -> None:
        self.group = None


class NcclModelReceiver(ModelReceiver):
    """The receiving end of vLLM's NCCL transport for a plain transformers model on a GPU (a live scorer's
    copy): joins the group vLLM's trainer engine hosts and unpacks its packed broadcast into the parameters."""

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_process_group

        self.info = NCCLWeightTransferInitInfo(**init_info)
        self.shutdown()  # a rebuilt group: destroy the old communicator before joining the new one

        class _Single:  # a plain model is one worker of one engine: its rank is the offset itself
            data_parallel_index, world_size, rank = 0, 1, 0

        self.group = worker_init_process_group(self.info, _Single())

    def update_weights(self, update_info: dict) -> ReceiveStats:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer

        params = dict(self.model.named_parameters())
        start = time.perf_counter()

        def load(pairs):
            with torch.no_grad():
                for name, tensor in pairs:
                    params[name].copy_(tensor)

        shapes = zip(update_info["names"], update_info["shapes"], update_info["dtype_names"], strict=True)
        packed_nccl_broadcast_consumer(
            iterator=((n, (s, getattr(torch, d))) for n, s, d in shapes), group=self.group, src=0,
            post_unpack_func=load, buffer_size_bytes=self.info.packed_buffer_size_bytes,
            num_buffers=self.info.packed_num_buffers, device=next(self.model.parameters()).device)
        torch.cuda.synchronize()
        return ReceiveStats(seconds=time.perf_counter() - start)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None


def make_receiver(model: torch.nn.Module, backend: str | None, role: str) -> ModelReceiver:
    """The receiving end for a plain model: gloo, vLLM's NCCL, or (object store, inline) loads by `load_state`."""
    return NcclModelReceiver(model, role) if backend == "nccl" else ModelReceiver(model, role)


def load_state(model: torch.nn.Module, named_tensors: dict[str, torch.Tensor]) -> None:
    """Copy a transformers-named state dict into `model` in place; every model parameter must be given."""
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in named_tensors]
    if missing:
        raise ValueError(f"weights missing for {missing[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(named_tensors[k].to(p.device, p.dtype))
