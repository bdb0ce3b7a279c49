"""The bookkeeping of probes read in vLLM's sampling pass (pipeline/transport/vllm_probes.py, actors/generator.py), on
small hand-made steps: which request and position each real row of a step is, the columns back in the probes'
order, a recomputed position, and the cut to completion tokens 0..T-2. (vLLM itself: tests/integration/
test_generator_probes.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.generator import completion_reads
from pipeline.analysis.cost import PRESETS, Workload, live_read_cost, step_cost
from pipeline.transport.vllm_probes import StepLog


class _Reads:
    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer

    def snapshot(self, rows: int) -> torch.Tensor:
        return self.buffer[:rows].clone()


def _v1_runner(req_ids, computed):
    """vLLM's V1 model runner: one persistent input batch (the fields StepLog reads)."""
    return SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids, num_computed_tokens_cpu=np.array(computed)))


def _v2_runner(req_ids, computed, scheduled):
    """Model Runner V2: the step's own InputBatch, in the installed vLLM's classes, left in
    execute_model_state between execute_model and sample_tokens (fields StepLog does not read stay None)."""
    import dataclasses

    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import ExecuteModelState

    n = len(req_ids)
    loc = np.concatenate([[0], np.cumsum(scheduled), [sum(scheduled)] * 2]).astype(np.int32)  # padded past n
    fields = {f.name: None for f in dataclasses.fields(InputBatch)}
    batch = InputBatch(**{**fields, "req_ids": list(req_ids), "num_reqs": n, "num_reqs_after_padding": n + 2,
                          "num_tokens": sum(scheduled), "query_start_loc_np": loc,
                          "num_computed_tokens_np": np.array(computed, dtype=np.int32),
                          "num_scheduled_tokens": np.array(scheduled, dtype=np.int32)})
    state = ExecuteModelState(**{**{f: None for f in ExecuteModelState._fields}, "input_batch": batch})
    return SimpleNamespace(execute_model_state=state)


def _step(log: StepLog, req_ids, computed, scheduled, rows: torch.Tensor, runner_kind: str = "v1") -> None:
    runner = (_v1_runner(req_ids, computed) if runner_kind == "v1" else _v2_runner(req_ids, computed, scheduled))
    out = SimpleNamespace(num_scheduled_tokens=dict(zip(req_ids, scheduled, strict=True)),
                          total_num_scheduled_tokens=sum(scheduled))
    padded = torch.cat([rows, torch.full((3, rows.shape[1]), -1.0)])  # CUDA-graph padding: never read
    log.record(runner, out, _Reads(padded))


@pytest.mark.parametrize("runner_kind", ["v1", "v2"])
def test_rows_map_to_requests_and_positions_and_columns_return_to_probe_order(runner_kind):
    # two probes; the buffer holds them grouped by layer as columns [1, 0] (column_of[k] = column of probe k)
    log = StepLog(column_of=[1, 0])
    # step 1: "0_7-abcd1234" prefills 3 tokens (chunk of a longer prompt), "1_7-ffff0000" prefills 2 from 1
    # (its first token came from the prefix cache)
    _step(log, ["0_7-abcd1234", "1_7-ffff0000"], [0, 1], [3, 2],
          torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0], [4.0, 14.0]]), runner_kind)
    # step 2: the batch reordered (V2 sorts each step's batch); one decode token each, and a request nobody
    # asks for (greedy evaluation)
    _step(log, ["1_7-ffff0000", "9-00000000", "0_7-abcd1234"], [3, 5, 3], [1, 1, 1],
          torch.tensor([[5.0, 15.0], [99.0, 99.0], [6.0, 16.0]]), runner_kind)
    # step 3: a position computed again (re-prefilled after an in-flight update) keeps its first reading
    _step(log, ["0_7-abcd1234"], [3], [1], torch.tensor([[66.0, 616.0]]), runner_kind)
    got = log.take(["0_7", "1_7"])
    assert got["0_7"] == ([0, 1, 2, 3], [[10.0, 0.0], [11.0, 1.0], [12.0, 2.0], [16.0, 6.0]])
    assert got["1_7"] == ([1, 2, 3], [[13.0, 3.0], [14.0, 4.0], [15.0, 5.0]])
    assert log.take(["0_7"]) == {}  # everything recorded went with the take


def test_a_v2_step_without_a_batch_records_nothing_and_an_unknown_runner_is_named():
    from pipeline.transport.vllm_probes import step_layout

    out = SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=4)
    assert step_layout(SimpleNamespace(execute_model_state=None), out) is None
    with pytest.raises(TypeError, match="V1 model runner and Model Runner V2; SimpleNamespace is neither"):
        step_layout(SimpleNamespace(), out)


def test_completion_reads_cover_tokens_0_to_t_minus_2_and_name_what_is_missing():
    read = ([3, 4, 5, 6], [[0.3, 1.3], [0.4, 1.4], [0.5, 1.5], [0.6, 1.6]])
    # prompt of 4 tokens (positions 0-3), completion of 3: tokens 0 and 1 sit at positions 4 and 5
    assert completion_reads(read, 4, 3, 2) == [[0.4, 0.5], [1.4, 1.5]]
    assert completion_reads(None, 4, 1, 2) == [[], []]  # one token: nothing was fed back
    with pytest.raises(RuntimeError, match=r"positions \[7\]"):
        completion_reads(read, 4, 5, 2)


def test_live_read_costs_match_the_passes_they_stand_for():
    a = PRESETS["7b"]
    w = Workload(prompts=4, group=2, prompt_len=10, completion_len=20, probe_layers=(5,), num_probes=3)
    c = live_read_cost(a, w)
    # a live scorer is the no-KL probe pass: truncated after the deepest probe, plus the dot products
    no_kl = step_cost(a, Workload(**{**w.__dict__, "kl": False})).flops["probe"]
    assert c["live_scorer"] == pytest.approx(no_kl)
    # the generator read: 2 H K FLOPs on each prompt token (once per group) and each fed-back completion token
    assert c["generator"] == 2 * a.hidden * 3 * (4 * 10 + 8 * 19)
    assert c["generator"] < 1e-6 * c["plain"] < c["live_scorer"]
