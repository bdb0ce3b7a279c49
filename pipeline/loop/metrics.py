"""Metrics: per-stage timers, one sink that writes `metrics.parquet` (one row per step), the step's metrics row
as the loop assembles it from every role's figures, its console line, and the run's summary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from actors.generator import GenerateStats
    from actors.scorer import ScoreStats
    from learner.learner import TrainStats
    from pipeline.loop.fleet import Fleet
    from pipeline.loop.loggers import Loggers


class StageTimer:
    """Accumulates wall seconds per stage name within one step: `with timer("learn"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class ParquetSink:
    """Appends flat `{key: number}` rows; rewrites the (small) file after every row so a crash loses nothing.

    Keys follow `stage/name` (`rollout/task_reward`, `learner/kl`, `time/step_wall_s`). A key that first
    appears late is back-filled with nulls in earlier rows.
    """

    def __init__(self, path: Path, loggers: Loggers | None = None) -> None:
        """An existing file's rows (a resumed run's) are kept and appended to. `loggers` (pipeline.loop.loggers.Loggers:
        TensorBoard, W&B) get every row once, under this file's name as their stream: rows of a resumed run that
        a killed process never got to them are sent first, and a step recomputed after a restart is not sent
        again (they cannot take a value back, and an exact restart recomputes the same one)."""
        self.path, self.loggers, self.stream = path, loggers, path.stem
        self.rows: list[dict[str, float | int | None]] = pq.read_table(path).to_pylist() if path.exists() else []
        if loggers is not None:
            loggers.catch_up(self.stream, self.rows)

    def truncate(self, up_to_step: int) -> None:
        """Drop the rows after `up_to_step` (they are about to be recomputed) and rewrite the file."""
        self.rows = [r for r in self.rows if r["step"] <= up_to_step]
        self._write()

    def log(self, row: dict[str, float | int | None]) -> None:
        self.rows.append(dict(row))
        self._write()
        if self.loggers is not None:
            self.loggers.log(row, stream=self.stream)

    def _write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in self.rows])
        tmp = self.path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.path)


def sync_metrics(fleet: Fleet) -> dict[str, float]:
    """The last weight sync's figures (collective transport only)."""
    s = fleet.last_sync
    if s is None:
        return {}
    out = {"sync/buckets": float(s.num_buckets), "sync/send_s": s.seconds,
           "sync/max_gathered_bytes": float(s.max_gathered_bytes)}
    if s.num_bytes is not None:  # only what the engine measured
        out["sync/bytes"] = float(s.num_bytes)
    return out



def step_metrics(step: int, version: int, staleness: int, reward_metrics: dict[str, float], gen_stats: list[GenerateStats], score_stats: list[ScoreStats], train_stats: list[TrainStats], timer: StageTimer) -> dict:
    """One metrics row. Time keys: `time/step_wall_s` is the step's real wall time in the driver (added by the
    loop); `time/stage/<stage>_s` the driver's time in each stage of it; `time/generate_wall_s` the step's
    generation wall time (first chunk's start to last chunk's end, on the generators); `time/score_busy_s`
    the scorers' summed busy time on this step; `time/learn_compute_s` the slowest learner rank's step."""
    from learner.losses import mismatch_metrics

    tokens = sum(s.num_tokens for s in gen_stats)
    gen_wall = max(s.end_time for s in gen_stats) - min(s.end_time - s.seconds for s in gen_stats)
    n_tok = sum(s.num_tokens for s in train_stats)

    def tok_mean(attr: str) -> float:
        return sum(getattr(s, attr) * s.num_tokens for s in train_stats) / max(n_tok, 1)

    row = {"step": step, "version": version, "pipeline/staleness": staleness, **reward_metrics,
           "rollout/tokens": tokens, "rollout/tokens_per_s": tokens / max(gen_wall, 1e-9),
           "learner/loss": tok_mean("loss"), "learner/policy_loss": tok_mean("policy_loss"),
           "learner/kl": tok_mean("kl"), "learner/clip_frac": tok_mean("clip_frac"),
           "learner/grad_norm": train_stats[0].grad_norm,
           "learner/probe_score": _row_mean(train_stats, "probe_score"),
           "learner/nonfinite_rows": train_stats[0].nonfinite_rows,
           **mismatch_metrics([s.mismatch for s in train_stats if s.mismatch]),
           "scorer/nonfinite": sum(s.num_nonfinite for s in score_stats),
           "scorer/padding_waste": float(np.mean([s.padding_waste for s in score_stats])),
           "time/generate_wall_s": gen_wall, "time/generate_busy_s": sum(s.seconds for s in gen_stats),
           "time/score_busy_s": sum(s.seconds for s in score_stats),
           "time/learn_compute_s": max(s.seconds for s in train_stats),
           # CPU threads each role computed on (pipeline.cores = "phase": they follow the phase; 0 on GPUs)
           "cores/generate_threads": float(np.mean([s.threads for s in gen_stats])),
           "cores/score_threads": float(np.mean([s.threads for s in score_stats])),
           "cores/learn_threads": float(np.mean([s.threads for s in train_stats]))}
    row.update({f"time/stage/{k}_s": v for k, v in timer.seconds.items()})
    return row



def _row_mean(stats, attr: str) -> float:
    """Mean over ranks weighted by their gradient-carrying rows (NaN when no rank measured it)."""
    pairs = [(getattr(s, attr), s.num_rows) for s in stats if math.isfinite(getattr(s, attr)) and s.num_rows]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else math.nan



def log_step(row: dict, log: Callable[[str], None], quiet: bool) -> None:
    step = row["step"]
    if quiet and step != 1 and step % 10:
        return
    log(f"step {step:4d}  task_reward {row['rollout/task_reward']:.3f}  shaped {row['rollout/shaped_reward']:.3f}  "
        f"kl {row['learner/kl']:.4f}  staleness {row['pipeline/staleness']}  {row['time/step_wall_s']:.2f}s/step")



def summarize(rows: list[dict], eval_start: float | None, eval_end: float | None, checkpoint: str | None,
              run_dir: Path) -> dict:
    def mean(key: str, part: slice) -> float:
        vals = [r[key] for r in rows[part] if r.get(key) is not None]
        return float(np.mean(vals)) if vals else math.nan

    k = max(1, len(rows) // 5)
    return {
        "run_dir": str(run_dir),
        "steps": len(rows),
        "task_reward_first_steps": mean("rollout/task_reward", slice(0, k)),
        "task_reward_last_steps": mean("rollout/task_reward", slice(-k, None)),
        "eval_greedy_accuracy_start": eval_start,
        "eval_greedy_accuracy_end": eval_end,
        "mean_step_wall_s": mean("time/step_wall_s", slice(None)),
        "final_checkpoint": checkpoint,
    }
