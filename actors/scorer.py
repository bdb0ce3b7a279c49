"""Scorer: a frozen transformers copy of the initial policy that scores rollouts with probes.

One forward pass over prompt + completion yields both the reference log-probs the KL term needs
and every probe's per-token scores (read by scoped hooks on the probed layers). Plain RLHF with a
KL penalty pays for that pass anyway, so probes cost almost nothing on top. With no KL term the
pass stops after the deepest probed layer. The reference log-probs come from `pipeline/data/logprobs.py`,
which applies the output head a chunk of positions at a time, so a batch never holds (tokens x vocab)
logits. A plain class; `pipeline/loop/remote.py` makes it an actor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from actors.frozen import load_frozen_model, role_device
from pipeline.config import ScorerConfig
from pipeline.data.batching import token_budget_batches
from pipeline.data.schema import ROLLOUT_SCHEMA, scored_schema
from pipeline.faults import maybe_die, maybe_slow_down
from pipeline.transport.weights import make_receiver

if TYPE_CHECKING:
    import torch

    from pipeline.transport.weights import WireWeights


@dataclass(frozen=True)
class ScoreStats:
    seconds: float
    num_sequences: int
    num_tokens: int  # prompt + completion tokens through the model
    num_nonfinite: int  # rows with a NaN/inf probe score
    padding_waste: float = 0.0  # fraction of the padded tokens of this call that were padding
    start_time: float = 0.0  # wall clock when this call began (it queued from the generator's end_time to here)
    threads: float = 0.0  # CPU threads it scored on, mean over its batches (pipeline.cores; 0: on a GPU)


class Scorer:
    def __init__(
        self,
        *,
        model_path: str,
        probe_paths: list[tuple[str, str | None]],  # (path, aggregation override)
        cfg: ScorerConfig,
        compute_ref: bool,
        dtype: str = "float32",
        pad_id: int = 0,
        weight_backend: str | None = None,  # live mode: how new weights arrive (see pipeline/transport/weights.py)
        carried: list[str] = (),  # probes the generators read: their columns pass through, after the scorers' own
    ) -> None:
        import torch

        from probes.probe import load_probe

        self.device = role_device(cfg.num_gpus)
        if self.device == "cpu":
            torch.set_num_threads(max(1, math.ceil(cfg.num_cpus)))
        from pipeline.cores import CoreShare

        self.cores = CoreShare.for_role(cfg.num_cpus, cpu=self.device == "cpu")  # pipeline.cores: threads per phase
        self.cfg = cfg
        self.compute_ref = compute_ref
        self.pad_id = pad_id
        self.model = load_frozen_model(model_path, dtype, self.device)  # the reference: never updated
        # "live": probes read a second copy that follows the learner's weights (costs a second pass);
        # "frozen": probes read the reference copy, fused with the reference log-prob pass.
        self.probe_model = load_frozen_model(model_path, dtype, self.device) if cfg.model == "live" else self.model
        self.receiver = make_receiver(self.probe_model, weight_backend, "live scorer") if cfg.model == "live" else None
        num_layers, hidden = self.model.config.num_hidden_layers, self.model.config.hidden_size
        self.probes = []
        for path, aggregation in probe_paths:
            probe = load_probe(path)
            probe.check_fits(num_layers, hidden, model_name=model_path)
            if aggregation is not None:
                probe.aggregation = aggregation
            self.probes.append(probe)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probe names must be unique, got {names}")
        self.carried = list(carried)
        self.schema = scored_schema(names + self.carried)

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    def score(self, rollouts: pa.Table) -> tuple[pa.Table, ScoreStats]:
        """Add ref_logprobs, nonfinite_score and per-probe columns to a rollout table (whose generator-read probe
        columns, if any, pass through after the scorers' own and count for nonfinite_score too)."""
        with self.cores.working():  # pipeline.cores = "phase": the node's idle cores too, refitted per batch
            return self._score(rollouts)

    def _score(self, rollouts: pa.Table) -> tuple[pa.Table, ScoreStats]:
        carried = {c: rollouts.column(c) for c in rollouts.schema.names if c not in ROLLOUT_SCHEMA.names}
        rollouts = rollouts.select(ROLLOUT_SCHEMA.names)
        assert rollouts.schema.equals(ROLLOUT_SCHEMA), rollouts.schema
        assert sorted(carried) == sorted(f"probe/{n}/{k}" for n in self.carried for k in ("tokens", "score")), carried
        maybe_die("scorer")
        start, start_time = time.perf_counter(), time.time()
        maybe_slow_down("scorer")
        prompts = rollouts.column("prompt_ids").to_pylist()
        completions = rollouts.column("completion_ids").to_pylist()
        n_rows = len(prompts)
        ref: list[list[float]] = [[] for _ in range(n_rows)]
        tokens: dict[str, list] = {p.name: [None] * n_rows for p in self.probes}
        aggs: dict[str, list] = {p.name: [None] * n_rows for p in self.probes}
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        batches = token_budget_batches(lengths, self.cfg.token_budget, self.cfg.batch_size)
        num_tokens = padded = 0
        for rows in batches:
            self.cores.fit()
            r, t, a, n = self._score_batch([prompts[i] for i in rows], [completions[i] for i in rows])
            num_tokens += n
            padded += max(lengths[i] for i in rows) * len(rows) if n else 0
            for k, i in enumerate(rows):
                ref[i] = r[k]
                for name in tokens:
                    tokens[name][i] = t[name][k]
                    aggs[name][i] = a[name][k]
        for name in self.carried:  # a generator reading of a one-token completion is empty: nothing to score there
            aggs[name] = [0.0 if not t else v for t, v in zip(carried[f"probe/{name}/tokens"].to_pylist(),
                                                              carried[f"probe/{name}/score"].to_pylist(), strict=True)]
        nonfinite = [not all(v is not None and math.isfinite(v) for v in (aggs[n][i] for n in aggs))
                     for i in range(len(prompts))]
        table = rollouts.append_column(self.schema.field("ref_logprobs"), pa.array(ref, pa.list_(pa.float32())))
        table = table.append_column(self.schema.field("nonfinite_score"), pa.array(nonfinite, pa.bool_()))
        for name in self.probe_names:
            table = table.append_column(self.schema.field(f"probe/{name}/tokens"), pa.array(tokens[name], pa.list_(pa.float32())))
            table = table.append_column(self.schema.field(f"probe/{name}/score"), pa.array(aggs[name], pa.float32()))
        for name in self.carried:
            for kind in ("tokens", "score"):
                table = table.append_column(self.schema.field(f"probe/{name}/{kind}"), carried[f"probe/{name}/{kind}"])
        stats = ScoreStats(time.perf_counter() - start, len(prompts), num_tokens, sum(nonfinite),
                           1 - num_tokens / padded if padded else 0.0, start_time,
                           self.cores.mean_threads if self.cores.cpu else 0.0)
        return table, stats

    def _score_batch(self, prompts: list[list[int]], completions: list[list[int]]):
        import torch

        from pipeline.data.batching import pack
        from pipeline.data.logprobs import model_logprobs
        from probes.hooks import capture_residuals
        from probes.probe import aggregate

        batch = pack(prompts, completions, self.pad_id)
        ids, attn = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        layers = sorted({p.layer for p in self.probes})
        fused = self.probe_model is self.model
        ref = [[] for _ in prompts]
        cap = None
        if self.compute_ref:
            # One pass for the reference log-probs and, with a frozen probe model, every probe's layers too.
            # The output head runs a chunk of positions at a time: no (B, T, vocab) logits are ever formed.
            with torch.no_grad(), capture_residuals(self.model, layers if fused else []) as ref_cap:
                logp = model_logprobs(self.model, ids, attn)  # (B, T-1)
            ref = [v.tolist() for v in batch.completion_values(logp.cpu(), shift=1)]
            cap = ref_cap if fused else None
        if layers and cap is None:
            # Nothing above the deepest probe is needed: stop the pass there.
            with torch.no_grad(), capture_residuals(self.probe_model, layers, stop_after=max(layers)) as cap:
                self.probe_model(input_ids=ids, attention_mask=attn)
        num_tokens = int(attn.sum()) if (self.compute_ref or layers) else 0
        comp_mask = batch.completion_mask.to(self.device)
        tok: dict[str, list[list[float]]] = {}
        agg: dict[str, list[float]] = {}
        for probe in self.probes:
            scores = probe.token_scores(cap.residuals[probe.layer])  # (B, T)
            tok[probe.name] = [v.tolist() for v in batch.completion_values(scores.cpu())]
            agg[probe.name] = aggregate(scores, comp_mask, probe.aggregation).cpu().tolist()
        return ref, tok, agg, num_tokens

    # --- live mode: the probe model takes each weight version like a generator does ----------------------

    def _live(self):
        if self.receiver is None:
            raise ValueError("scorer.model is \"frozen\": the frozen copy never takes new weights")
        return self.receiver

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._live().init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self._live().start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self._live().update_weights(update_info)

    def finish_weight_update(self, weight_version: str) -> int:
        self._live().finish_weight_update(weight_version)
        return self.version

    def shutdown_weight_transfer_engine(self) -> None:
        self._live().shutdown()

    def load_weights(self, weights: WireWeights | dict[str, torch.Tensor], version: int) -> int:
        """The object-store transport: `WireWeights` (or a state dict) into the live probe model."""
        from pipeline.transport.weights import from_wire, load_state

        load_state(self._live().model, from_wire(weights))
        self.receiver.version = version
        return version

    @property
    def version(self) -> int:
        return self.receiver.version if self.receiver is not None else 0

    def refit_probe(self, name: str, rollouts: pa.Table, labels: list[int]) -> tuple[dict, dict]:
        """Refit probe `name` on the probe model's activations of these rollouts (labels 0/1 per row).

        Returns (tensors, held-out metrics); the driver hands the tensors to every scorer with `set_probe`.
        """
        import torch

        from probes.toolkit import completion_activations, fit_probe, probe_metrics, score_sequences

        probe = next(p for p in self.probes if p.name == name)
        acts = completion_activations(self.probe_model, rollouts.column("prompt_ids").to_pylist(),
                                      rollouts.column("completion_ids").to_pylist(), [probe.layer],
                                      self.cfg.batch_size, self.pad_id)[probe.layer]
        groups = rollouts.column("group_id").to_pylist()
        held = held_out_groups(groups, labels)
        train = [i for i, g in enumerate(groups) if g not in held]
        test = [i for i, g in enumerate(groups) if g in held]
        new = fit_probe([acts[i] for i in train], [labels[i] for i in train], name, probe.layer, probe.aggregation)
        metrics = probe_metrics(score_sequences(new, [acts[i] for i in test]),
                                torch.tensor([labels[i] for i in test], dtype=torch.float32))
        return {"weight": new.weight, "bias": new.bias}, metrics

    def set_probe(self, name: str, tensors: dict) -> None:
        probe = next(p for p in self.probes if p.name == name)
        assert tensors["weight"].shape == probe.weight.shape
        probe.weight, probe.bias = tensors["weight"].float(), tensors["bias"].float().reshape(1)

    def ready(self) -> list[str]:
        return self.probe_names

    def pid(self) -> int:
        import os

        return os.getpid()


def held_out_groups(groups: list[int], labels: list[int]) -> set[int]:
    """Every fifth prompt group with a positive and every fifth without, held out for a refit's metrics; a
    positive group is always left for fitting (positives are rare under a penalty)."""
    positive = sorted({g for g, y in zip(groups, labels, strict=True) if y})
    negative = sorted(set(groups) - set(positive))
    return set(positive[::5][: max(0, len(positive) - 1)]) | set(negative[::5])
