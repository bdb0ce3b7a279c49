"""The bounds a weight transfer without timeouts of its own gets (vLLM's NCCL engine pair): `Watchdog` turns "no
progress for weights.timeout_s" into a TransferError naming the transfer, lets a slow call that keeps making
progress finish, and passes a call's own error through. Threads here stand in for a CUDA stream; NCCL itself
needs a GPU build of vLLM."""

import threading
import time

import pytest

from pipeline.transport.weights import TransferError, Watchdog


def test_a_call_that_stops_making_progress_fails_within_the_bound_naming_it():
    stuck = threading.Event()
    dog = Watchdog(0.6, "NCCL broadcast of weights version 7")
    start = time.monotonic()
    with pytest.raises(TransferError, match=r"NCCL broadcast of weights version 7: no progress for 1s"):
        dog.run(stuck.wait)  # blocks, as a broadcast to a frozen peer does
    assert 0.6 <= time.monotonic() - start < 2.0
    stuck.set()


def test_a_slow_call_that_keeps_making_progress_is_not_cut_short():
    dog = Watchdog(0.5, "broadcast")

    def slow():  # 2 s in all, a tensor every 0.1 s
        for _ in range(20):
            time.sleep(0.1)
            dog.tick()
        return "sent"

    assert dog.run(slow) == "sent"


def test_the_calls_own_error_comes_through():
    def refuse():
        raise ValueError("metadata disagrees with iteration")

    with pytest.raises(ValueError, match="metadata disagrees"):
        Watchdog(5.0, "broadcast").run(refuse)
