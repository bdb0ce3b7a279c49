"""Rewarder: task reward + probe shaping + GRPO advantages on a scored table. Cheap; runs in the driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.data.batching import finite_rows
from pipeline.data.schema import REWARD_FIELDS, check_schema, scored_schema, train_schema
from pipeline.data.shaping import evasion_rate, group_advantages, shape_rewards
from pipeline.worlds.tasks import GROUND_TRUTH
from pipeline.worlds.world import World


class Rewarder:
    def __init__(self, cfg: Config, world: World, history: list[dict] | None = None) -> None:
        """`history`: the run's metric rows so far (a resumed run keeps its first step's obfuscation baseline)."""
        from probes.probe import load_probe

        self.shaping = cfg.shaping
        self.world = world
        self.probe_names = world.column_names
        self.shaping_probe = cfg.shaping.probe or (self.probe_names[0] if self.probe_names else None)
        self.seed = cfg.pipeline.seed
        # the column the reward reads: the shaping probe's, or its random-direction control's
        self.monitored = (f"{self.shaping_probe}_random" if cfg.shaping.monitor == "random_direction"
                          else self.shaping_probe)
        # generator readings with a scorer twin: (reading, twin, aggregation) for the obfuscation decomposition
        self.pairs = [(g.name, g.twin, g.aggregation or load_probe(g.stem).aggregation)
                      for g in world.generator_probes if g.twin is not None]
        self.history = history if history is not None else []

    def __call__(self, scored: pa.Table) -> tuple[pa.Table, dict[str, float], np.ndarray | None]:
        """(train table, metrics, ground-truth class of each row or None when the task has no ground truth)."""
        check_schema(scored, scored_schema(self.probe_names), "scorer -> rewarder")
        completion_ids = scored.column("completion_ids").to_pylist()
        texts = self.world.decode(completion_ids)
        answers = scored.column("answer").to_pylist()
        rows = scored.column("prompt_id").to_pylist()
        task = np.asarray(self.world.reward(texts, answers, rows), dtype=np.float32)
        if task.shape != (scored.num_rows,):
            raise ValueError(f"task.reward_fn returned {task.shape[0] if task.ndim else 'a scalar'} values "
                             f"for {scored.num_rows} completions; it must return one float per completion")
        score = None
        text = self.world.text_monitor.scores(completion_ids) if self.world.text_monitor is not None else None
        if self.shaping.monitor == "truth":
            score = truth_monitor(self.world.truth(texts, answers, rows), self.shaping.truth_accuracy,
                                  self.seed, scored.column("group_id").to_numpy())
        elif self.shaping.monitor == "text":
            score = text
        elif self.shaping_probe is not None:
            score = scored.column(f"probe/{self.monitored}/score").to_numpy(zero_copy_only=False)
        shaped, mask = shape_rewards(task, score, self.shaping.kind, self.shaping.coef, self.shaping.threshold)
        mask &= ~scored.column("nonfinite_score").to_numpy(zero_copy_only=False)  # never train on a NaN score
        finite_logprobs = finite_rows(scored, ["behavior_logprobs", "ref_logprobs"])  # nor on a NaN log-prob
        mask &= finite_logprobs
        adv = group_advantages(shaped, scored.column("group_id").to_numpy(), mask)
        table = scored
        for f, values in zip(REWARD_FIELDS, (task, shaped, mask, adv), strict=True):
            table = table.append_column(f, pa.array(values, f.type))
        check_schema(table, train_schema(self.probe_names), "rewarder -> learner")
        lengths = np.array([len(c) for c in completion_ids])
        metrics = {
            "rollout/task_reward": float(task.mean()),
            "rollout/shaped_reward": float(shaped.mean()),
            "rollout/masked_frac": float(1 - mask.mean()),
            "rollout/nonfinite_logprob_rows": int((~finite_logprobs).sum()),
            "rollout/completion_len": float(lengths.mean()),
        }
        truth = self.world.truth(texts, answers, rows) if self.world.ground_truth_fn else None
        if truth is not None:
            truth = np.asarray(truth)
            for cls in GROUND_TRUTH:
                metrics[f"rollout/{cls}_rate"] = float((truth == cls).mean())
            if score is not None:  # hacks the shaping probe (or the only probe) misses, whatever the shaping kind
                metrics["rollout/evasion_rate"] = evasion_rate(score, truth, self.shaping.threshold)
        for live, frozen, how in self.pairs:
            metrics.update(self.decomposition(scored, live, frozen, how))
        readings = [(name, scored.column(f"probe/{name}/score").to_numpy(zero_copy_only=False))
                    for name in self.probe_names] + ([("text", text)] if text is not None else [])
        for name, s in readings:
            metrics[f"scorer/{name}_mean"] = _nanmean(s)
            if truth is not None:  # the score distribution split by what really happened
                for cls in GROUND_TRUTH:
                    metrics[f"scorer/{name}_mean_{cls}"] = _nanmean(s[truth == cls])
        return table, metrics, truth

    def decomposition(self, scored: pa.Table, live: str, frozen: str, how: str) -> dict[str, float]:
        """The change of a probe's score since the run's first step, split the way the obfuscation literature
        splits it: `representation` = live reading minus frozen reading on this step's completions (the same
        tokens: the frozen copy's scores of completion tokens 0..T-2, the positions the generator reads);
        `behaviour` = the frozen reading now minus at the first step (what changed in the completions themselves);
        `total` = their sum, the live reading now minus the frozen reading at the first step."""
        from probes.probe import aggregate_ragged

        live_s = scored.column(f"probe/{live}/score").to_numpy(zero_copy_only=False).astype(np.float64)
        rows = scored.column(f"probe/{frozen}/tokens").to_pylist()
        # the positions the generator reads: all but the last completion token
        frozen_s = np.array(aggregate_ragged([r[:-1] for r in rows], how), dtype=np.float64)
        ok = np.isfinite(live_s) & np.isfinite(frozen_s)
        key = f"obfuscation/{live}"
        if not ok.any():
            return {}
        frozen_mean, live_mean = float(frozen_s[ok].mean()), float(live_s[ok].mean())
        base = next((r[f"{key}/frozen"] for r in self.history if r.get(f"{key}/frozen") is not None), frozen_mean)
        return {f"{key}/live": live_mean, f"{key}/frozen": frozen_mean,
                f"{key}/representation": live_mean - frozen_mean, f"{key}/behaviour": frozen_mean - base,
                f"{key}/total": live_mean - base}

    def sample(self, batch: pa.Table, num: int, step: int) -> pa.Table:
        """The first `num` rows of a train batch with step and decoded text, for rollouts.parquet."""
        part = batch.slice(0, num)
        part = part.append_column("step", pa.array([step] * part.num_rows, pa.int64()))
        part = part.append_column("prompt_text", pa.array(self.world.decode(part.column("prompt_ids").to_pylist())))
        return part.append_column("completion_text", pa.array(self.world.decode(part.column("completion_ids").to_pylist())))


def truth_monitor(truth: np.ndarray, accuracy: float, seed: int, groups: np.ndarray) -> np.ndarray:
    """A monitor that is the ground truth at a known accuracy: 1.0 for "hack", 0.0 otherwise, each sample's label
    flipped with probability 1 - accuracy, by a draw fixed by the run's seed, the sample's group and its place in
    the group (so a rerun flips the same samples)."""
    label = (np.asarray(truth) == "hack").astype(np.float32)
    if accuracy >= 1.0:
        return label
    place = np.zeros(len(groups), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, g in enumerate(groups.tolist()):
        place[i] = seen.get(g, 0)
        seen[g] = place[i] + 1
    draws = np.array([np.random.default_rng([seed, int(g), int(k)]).random() for g, k in zip(groups, place,
                                                                                            strict=True)])
    return np.where(draws < 1.0 - accuracy, 1.0 - label, label).astype(np.float32)


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")
