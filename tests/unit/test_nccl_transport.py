"""The NCCL transport's logic without a GPU, on vLLM 0.32's own engine classes with only their NCCL calls
replaced. The bounds of the trainer engine (pipeline/transport/vllm_weights.py: `bounded_nccl_trainer_engine`):
the wait for receivers still busy generating is not the transfer's to bound; a broadcast that stops taking
tensors is; a rank that sends nothing is not watched at all. And a receiver joining a rebuilt group destroys
the communicator of the old one (vLLM's worker engine, the live scorer's NcclModelReceiver)."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.transport.weights import TransferError

TIMEOUT_S = 0.6


class _Source:
    """Two tensors; `stall_after` stalls the iteration (a broadcast or a gather that stopped moving)."""

    def __init__(self, stall_after: int | None = None, stall_s: float = 0.0) -> None:
        self.tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
        self.stall_after, self.stall_s = stall_after, stall_s

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.tensors.items()]

    def groups(self):
        return [list(self.tensors)]

    def iter_groups(self):
        yield list(self.tensors), list(self.tensors.values())

    def __iter__(self):
        for i, (n, t) in enumerate(self.tensors.items()):
            if i == self.stall_after:
                time.sleep(self.stall_s)
            yield n, t


class _Client:
    """The receivers: `start_weight_update` returns only when their generation is done (`busy_s`)."""

    def __init__(self, busy_s: float = 0.0) -> None:
        self.busy_s, self.calls, self.version = busy_s, [], 7

    def start_weight_update(self):
        time.sleep(self.busy_s)
        self.calls.append("start")

    def update_weights(self, info):
        self.calls.append(("update", tuple(info["names"])))

    def finish_weight_update(self, weight_version=None):
        self.calls.append("finish")


def _engine(client, source, is_sender=True):
    from pipeline.transport.vllm_weights import bounded_nccl_trainer_engine

    class Engine(bounded_nccl_trainer_engine()):
        sent: list[str]

        def _broadcast(self, source, meta):  # vLLM's loop over the source, without the NCCL call
            self.sent = [name for name, _ in source]

        def _post_send_sync(self):
            pass

    engine = Engine(client=client, source=source, is_sender=is_sender)
    engine.timeout_s = TIMEOUT_S
    return engine


def test_receivers_busy_longer_than_the_timeout_are_waited_for_not_failed():
    client = _Client(busy_s=3 * TIMEOUT_S)  # a generation running past weights.timeout_s
    engine = _engine(client, _Source())
    engine.send_weights()
    assert client.calls == ["start", ("update", ("a", "b")), "finish"]  # started once, before the transfer
    assert engine.sent == ["a", "b"] and engine.last.version == 7
    assert engine.last.num_bytes == 3 * 4 + 4 * 4
    assert engine.source.__class__ is _Source and engine.client is client  # put back after the send


def test_a_broadcast_that_stops_moving_fails_within_the_timeout_naming_the_version():
    client = _Client()
    engine = _engine(client, _Source(stall_after=1, stall_s=20 * TIMEOUT_S))
    start = time.monotonic()
    with pytest.raises(TransferError, match="NCCL broadcast of weights version 7: no progress"):
        engine.send_weights()
    assert time.monotonic() - start < 8 * TIMEOUT_S
    assert client.calls == ["start", ("update", ("a", "b"))]  # never finished: the group is torn down instead


def test_a_rank_that_sends_nothing_is_not_watched_and_calls_no_receiver():
    client = _Client()
    # its gathers wait for rank 0, which itself waits for the receivers: longer than the transfer timeout
    engine = _engine(client, _Source(stall_after=0, stall_s=3 * TIMEOUT_S), is_sender=False)
    engine.send_weights()
    assert client.calls == [] and engine.last.num_bytes == 0 and engine.last.seconds >= 3 * TIMEOUT_S


class _Comm:
    def __init__(self, name: str) -> None:
        self.name, self.destroyed = name, False

    def destroy(self) -> None:
        self.destroyed = True


def _init_info(port: int) -> dict:
    return {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}


def test_a_vllm_worker_joining_a_rebuilt_group_destroys_the_old_communicator(monkeypatch):
    import vllm.distributed.weight_transfer.nccl_engine as nccl
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from pipeline.transport.vllm_weights import closing_nccl_worker_engine, register

    register()  # what the vLLM plugin runs in every vLLM process
    cls = WeightTransferEngineFactory._registry["nccl"]()
    assert cls is closing_nccl_worker_engine() and issubclass(cls, nccl.NCCLWeightTransferEngine)
    made = []
    monkeypatch.setattr(nccl, "worker_init_process_group", lambda info, _p: made.append(_Comm(info.master_port))
                        or made[-1])
    engine = cls.__new__(cls)  # the state init_transfer_engine touches; the rest needs a vLLM worker
    engine.model_update_group, engine.parallel_config = None, None
    for port in (5001, 5002):
        engine.init_transfer_engine(engine.parse_init_info(_init_info(port)))
    assert [c.name for c in made] == [5001, 5002]
    assert made[0].destroyed and not made[1].destroyed and engine.model_update_group is made[1]


def test_a_live_scorer_joining_a_rebuilt_group_destroys_the_old_communicator(monkeypatch):
    import vllm.distributed.weight_transfer.nccl_common as common

    from pipeline.transport.weights import make_receiver

    made = []
    monkeypatch.setattr(common, "worker_init_process_group", lambda info, _p: made.append(_Comm(info.master_port))
                        or made[-1])
    receiver = make_receiver(torch.nn.Linear(2, 2), "nccl", "scorer 0")
    for port in (6001, 6002):
        receiver.init_weight_transfer_engine(_init_info(port))
    assert made[0].destroyed and not made[1].destroyed and receiver.group is made[1]
    receiver.shutdown()
    assert made[1].destroyed and receiver.group is None
