"""Probe scores read inside vLLM's own forward pass: the generator returns them with the tokens it samples.

A linear probe needs one dot product per token at one layer, and the generator has just computed that layer
while sampling. This module makes vLLM hand the dot products back, without a second forward pass and without
a hidden vector leaving the worker:

- **Installed before anything compiles.** `ProbeReadLoader` is a vLLM model loader (registered as load format
  `probe_rl` by the plugin in pipeline/transport/vllm_weights.py). It loads the model as vLLM's default loader does, then
  puts a forward hook on each probed decoder block. Loading precedes vLLM's profiling run, torch.compile and
  CUDA-graph capture, so the hook is traced into compiled graphs and captured in CUDA graphs (a hook added
  after compilation is silently skipped on compiled paths).
- **Preallocated, sync-free.** The hook computes sigmoid(h . w + b) for every row of the step's flattened batch
  (h: the block's residual stream, hidden + residual in vLLM's deferred-add layout) and writes the (rows, K)
  scores into a buffer allocated once for the most tokens a step can hold. Probe weights live in tensors that
  are overwritten in place (`copy_`) when probes are refit, so compiled graphs and captured CUDA graphs keep
  reading the right memory.
- **Real rows only.** After each model step the worker extension (pipeline/transport/vllm_worker.py) records which
  request and position each real row was (the model runner's own batch layout and positions) and clones the
  real rows of the buffer on the device, in stream order, with no host sync; padded rows of a CUDA-graph
  batch are never read. `take` moves everything to the host once, when the generator collects a call's scores.

Positions: a completion of T tokens is sampled from the states at positions P-1 .. P+T-2 (P prompt tokens);
its last token is never fed back, so its activation is never computed while sampling. A probe read on the
generator therefore scores completion tokens 0 .. T-2 (each at its own position, P .. P+T-2, as the scorers
read them): T-1 scores per completion, aggregated over those. The comparison with a frozen-copy reading of the
same probe uses the same T-1 positions (`pipeline/loop/rewarder.py`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

if TYPE_CHECKING:
    from vllm.config import LoadConfig, ModelConfig, VllmConfig

LOAD_FORMAT = "probe_rl"
EXTRA_KEY = "probe_rl_reads"  # model_loader_extra_config[EXTRA_KEY] = ReadSpec as a dict


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """Which layers are read and how many probes each has; the weights come later (`ProbeReads.set_weights`)."""

    layers: list[int]  # layer of probe k, for each of the K probes (a layer may repeat)
    hidden_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "hidden_size": int(self.hidden_size)}


class ProbeReads:
    """The hooks, weights and score buffer on one vLLM model; `model.probe_rl_reads` after loading."""

    def __init__(self, model: torch.nn.Module, spec: ReadSpec, max_tokens: int, device: torch.device) -> None:
        from probes.hooks import decoder_layers

        blocks = decoder_layers(model)
        for layer in spec.layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"a generator-read probe reads layer {layer}, but the model has decoder layers "
                                 f"0..{len(blocks) - 1}")
        self.num_probes = len(spec.layers)
        self.hidden_size = spec.hidden_size
        self.scores = torch.zeros((max_tokens, self.num_probes), dtype=torch.float32, device=device)
        self.groups: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # (layer, W (k, H), b (k,), column)
        column = 0
        for layer in sorted(set(spec.layers)):
            k = spec.layers.count(layer)
            weight = torch.zeros((k, spec.hidden_size), dtype=torch.float32, device=device)
            bias = torch.zeros((k,), dtype=torch.float32, device=device)
            self.groups.append((layer, weight, bias, column))
            column += k
        # probe k of the spec -> its column in `scores` (probes of one layer are read together)
        order = sorted(range(self.num_probes), key=lambda k: (spec.layers[k], k))
        self.column_of = [order.index(k) for k in range(self.num_probes)]
        self.handles = [blocks[layer].register_forward_hook(self._hook(weight, bias, column))
                        for layer, weight, bias, column in self.groups]

    def _hook(self, weight: torch.Tensor, bias: torch.Tensor, column: int):
        scores, k = self.scores, weight.shape[0]

        def hook(_module, _args, output):
            if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
                hidden = output[0].float() + output[1].float()  # vLLM's deferred residual add: the stream is the sum
            else:
                hidden = (output[0] if isinstance(output, tuple) else output).float()
            rows = hidden.shape[0]
            scores[:rows, column:column + k] = torch.sigmoid(hidden @ weight.t() + bias)
            return None

        return hook

    def set_weights(self, weights: list[list[float]], biases: list[float]) -> None:
        """Probe k's weight (H,) and bias, in spec order, copied into the tensors the hooks read (in place)."""
        if len(weights) != self.num_probes or len(biases) != self.num_probes:
            raise ValueError(f"{len(weights)} probe weights for {self.num_probes} generator-read probes")
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            column = self.column_of[k]
            for _layer, weight, bias, start in self.groups:
                if start <= column < start + weight.shape[0]:
                    weight[column - start].copy_(torch.as_tensor(w, dtype=torch.float32))
                    bias[column - start].fill_(float(b))

    def snapshot(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the buffer (a step's real tokens), copied on the device: no host sync."""
        return self.scores[:rows].clone()


class ProbeReadLoader(DefaultModelLoader):
    """vLLM's default loader, then the probe reads: `LLM(load_format="probe_rl",
    model_loader_extra_config={"probe_rl_reads": ReadSpec.to_dict()})`."""

    def __init__(self, load_config: LoadConfig) -> None:
        extra = dict(load_config.model_loader_extra_config or {})
        self.read_spec = ReadSpec(**extra.pop(EXTRA_KEY)) if EXTRA_KEY in extra else None
        super().__init__(dataclasses.replace(load_config, load_format="auto", model_loader_extra_config=extra))

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> torch.nn.Module:
        model = super().load_model(vllm_config, model_config, prefix)
        if self.read_spec is not None:
            sched = vllm_config.scheduler_config
            max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
            device = next(model.parameters()).device
            model.probe_rl_reads = ProbeReads(model, self.read_spec, max_tokens, device)
        return model


def register_loader() -> None:
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:
        register_model_loader(LOAD_FORMAT)(ProbeReadLoader)


def step_layout(runner: Any, scheduler_output: Any) -> tuple[list[str], Any, Any] | None:
    """The rows of the model step just run, in the order the forward pass laid them out: (request ids, rows of
    each, each one's computed-token count before the step), or None when the step ran no request. Called right
    after the runner's `execute_model`, before it samples.

    - vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, also the CPU runner's base) keeps one
      persistent `runner.input_batch`; its requests' rows are laid out in its order.
    - Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`, what vLLM 0.32 runs on GPUs whenever Triton
      imports) has no persistent batch: each step builds an `InputBatch` in its own sorted order and leaves it in
      `runner.execute_model_state.input_batch` until `sample_tokens` takes it. Request i's rows are
      `query_start_loc_np[i]:query_start_loc_np[i + 1]` of the flattened step."""
    import numpy as np

    if hasattr(runner, "input_batch"):  # V1
        batch = runner.input_batch
        req_ids = list(batch.req_ids)
        if not req_ids:
            return None
        counts = np.array([scheduler_output.num_scheduled_tokens[r] for r in req_ids], dtype=np.int64)
        return req_ids, counts, batch.num_computed_tokens_cpu[:len(req_ids)].astype(np.int64)
    state = getattr(runner, "execute_model_state", None)
    batch = getattr(state, "input_batch", None)
    if batch is None:
        if not hasattr(runner, "execute_model_state"):
            raise TypeError(f"probes read on the generator support vLLM's V1 model runner and Model Runner V2; "
                            f"{type(runner).__name__} is neither (set generator probes off, or pin vLLM 0.32)")
        return None
    n = int(batch.num_reqs)
    if n == 0:
        return None
    starts_loc = np.asarray(batch.query_start_loc_np[:n + 1], dtype=np.int64)
    counts = np.diff(starts_loc)
    if int(starts_loc[n]) != int(batch.num_tokens):  # adaptive verification (spec decoding): refused at start-up
        raise ValueError(f"a step of {batch.num_tokens} tokens whose requests' rows add up to {int(starts_loc[n])}")
    return list(batch.req_ids[:n]), counts, np.asarray(batch.num_computed_tokens_np[:n], dtype=np.int64)


class StepLog:
    """What the worker keeps per model step until the generator takes it: (request ids, rows per request,
    positions of the rows, device scores of the rows)."""

    def __init__(self, column_of: list[int]) -> None:
        self.column_of = column_of
        self.steps: list[tuple[list[str], Any, Any, torch.Tensor]] = []

    def record(self, runner: Any, scheduler_output: Any, reads: ProbeReads) -> None:
        import numpy as np

        if not scheduler_output.total_num_scheduled_tokens:
            return
        layout = step_layout(runner, scheduler_output)
        if layout is None:
            return
        req_ids, counts, starts = layout
        rows = int(counts.sum())
        # The runner's positions: each request's computed-token count before this step, plus 0..count-1 (its
        # device copy of them is not read: that would sync). Speculative decoding, where the host count is
        # optimistic, is refused when probes are read on the generator.
        positions = np.repeat(starts, counts) + (np.arange(rows) - np.repeat(np.cumsum(counts) - counts, counts))
        self.steps.append((req_ids, counts, positions, reads.snapshot(rows)))

    def take(self, keys: list[str]) -> dict[str, tuple[list[int], list[list[float]]]]:
        """key (a request id without vLLM's random suffix) -> (positions, per-position scores (K,)), for the keys
        asked; everything recorded is dropped (other requests' rows: greedy evaluation, warm-up)."""
        import numpy as np

        steps, self.steps = self.steps, []
        if not steps:
            return {}
        scores = torch.cat([s for *_, s in steps]).cpu().numpy()  # the one host sync of a generate call
        scores = scores[:, self.column_of]  # buffer columns (grouped by layer) -> the spec's probe order
        wanted = set(keys)
        found: dict[str, dict[int, np.ndarray]] = {}
        offset = 0
        for req_ids, counts, positions, snap in steps:
            start = offset
            for rid, count in zip(req_ids, counts, strict=True):
                key = rid.rsplit("-", 1)[0]
                if key in wanted:
                    per = found.setdefault(key, {})
                    for j in range(start, start + int(count)):
                        # A position computed again (a preempted sequence, or one re-prefilled under new weights
                        # by an in-flight update) keeps its first reading: the pass that sampled with it.
                        per.setdefault(int(positions[j - offset]), scores[j])
                start += int(count)
            offset += snap.shape[0]
        out = {}
        for key, per in found.items():
            pos = sorted(per)
            out[key] = (pos, [per[p].tolist() for p in pos])
        return out
