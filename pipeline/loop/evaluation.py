"""What the loop measures about the probes and the policy besides training: evaluation points (the evaluator
actor, actors/evaluator.py), greedy held-out accuracy, and the probe refit on the run's own rollouts
(`scorer.retrain_every`), whose result every reading of the probe takes."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.loop.metrics import ParquetSink
from pipeline.worlds.world import World

if TYPE_CHECKING:
    from pipeline.loop.fleet import Fleet


class ProbeRetrainer:
    """Every `scorer.retrain_every` steps, refit the shaping probe on recent on-policy rollouts labelled by
    the task's ground truth (1 = "hack") and hand it to every scorer (and the evaluator)."""

    def __init__(self, cfg: Config, fleet: Fleet) -> None:
        self.cfg, self.fleet = cfg, fleet
        self.window: deque[tuple[pa.Table, np.ndarray]] = deque(maxlen=cfg.scorer.retrain_window)

    def __call__(self, step: int, batch: pa.Table, truth: np.ndarray | None) -> dict[str, float]:
        from pipeline.data.schema import ROLLOUT_SCHEMA
        from pipeline.loop.remote import wait

        every = self.cfg.scorer.retrain_every
        if not every or truth is None:
            return {}
        self.window.append((batch.select(ROLLOUT_SCHEMA.names), (truth == "hack").astype(int)))
        if step % every:
            return {}
        table = pa.concat_tables([b for b, _ in self.window])
        labels = np.concatenate([y for _, y in self.window])
        if labels.min() == labels.max():
            return {"scorer/retrain_skipped": 1.0}  # one class only: nothing to fit
        fleet = self.fleet
        name = self.cfg.shaping.probe or fleet.world.column_names[0]
        # A probe read on the generators is refit on its scorer twin's activations; every reading of the probe
        # (scorers' and generators') takes the result.
        on_scorer = next((g.twin for g in fleet.world.generator_probes if g.name == name), None) or name
        readings = {on_scorer} | {g.name for g in fleet.world.generator_probes if g.twin == on_scorer or g.name == name}
        t = self.cfg.pipeline.timeout_s
        tensors, metrics = wait(fleet.scorers[0].refit_probe.remote(on_scorer, table, labels.tolist()),
                                "scorer (refit)", t)
        fleet.set_probes({**fleet.probe_overrides, **{r: {k: v.clone() for k, v in tensors.items()} for r in readings}})
        return {"scorer/retrain_auroc": metrics["auroc"], "scorer/retrain_positives": float(labels.sum())}



def probe_eval(cfg: Config, fleet: Fleet, sink: ParquetSink, step: int, checkpoint: str | None,
               scored: pa.Table | None) -> dict:
    """Evaluation point: AUROCs of the probes on the policy in `checkpoint` (None: the initial one) and on the
    frozen copy (see actors/evaluator.py)."""
    from pipeline.loop.remote import wait

    if fleet.evaluator is None:
        return {}
    metrics = wait(fleet.evaluator.report.remote(checkpoint, scored), "evaluator", cfg.pipeline.timeout_s)
    sink.log({"step": step, **metrics})
    return metrics



def greedy_accuracy(cfg: Config, world: World, fleet: Fleet) -> float | None:
    """Greedy accuracy of generator 0 on the held-out eval prompts (None when there are none): the
    ground truth's "correct" rate when the task has one (a loophole verifier would flatter), else the reward."""
    from pipeline.loop.remote import wait

    if not world.eval_prompts:
        return None
    outs = wait(
        fleet.generators[0].greedy.remote(world.eval_prompt_ids, cfg.generator.max_new_tokens),
        "generator (eval)", cfg.pipeline.timeout_s,
    )
    texts = world.decode(outs)
    rows = list(range(len(texts)))
    if world.ground_truth_fn is not None:
        return float(np.mean([t == "correct" for t in world.truth(texts, world.eval_prompts.answers, rows, True)]))
    return float(np.mean(world.reward(texts, world.eval_prompts.answers, rows, True)))
