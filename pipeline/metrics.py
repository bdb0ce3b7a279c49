"""Metrics: per-stage timers and one sink that writes `metrics.parquet` (one row per step)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


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

    def __init__(self, path: Path, loggers=None) -> None:
        """An existing file's rows (a resumed run's) are kept and appended to. `loggers` (pipeline.loggers.Loggers:
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
