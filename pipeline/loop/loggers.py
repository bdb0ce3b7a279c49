"""Optional metric sinks beside `metrics.parquet` (which stays the record every report reads):
TensorBoard event files and Weights & Biases (offline by default: it needs no network; `wandb sync` uploads
later). Chosen with `run.loggers = ["tensorboard", "wandb"]`; both are off by default.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RunConfig

FLUSH_WAIT_S = 30.0  # how long closing an offline W&B run waits for its file to hold the last step sent


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """Scalars to `<run>/tensorboard/` (open with `tensorboard --logdir runs/`)."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict, prefix: str = "") -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(prefix + key, value, global_step=int(row["step"]))
        self.writer.flush()

    def last_step(self, keys: set[str]) -> int:
        """The last step this run's event files hold a value of `keys` at (-1: none)."""
        if not (self.run_dir / "tensorboard").is_dir():
            return -1
        series = read_tensorboard(self.run_dir)
        return max((s for k in keys & set(series) for s, _ in series[k]), default=-1)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in `<run>/wandb/` (mode `run.wandb_mode`, offline by default), named after the run folder."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import wandb

        self.run_dir, self.mode = run_dir, cfg.wandb_mode
        # A resumed run (`probe-rl run --resume`) continues the same W&B run rather than starting a second one.
        id_file = run_dir / "wandb" / "probe_rl_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), mode=cfg.wandb_mode,
                              config={"run_dir": run_dir.name}, id=run_id, resume="allow",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.define_metric("*", step_metric="step")
        self.logged = -1  # the last step sent

    def log(self, row: dict, prefix: str = "") -> None:
        self.run.log({"step": int(row["step"]), **{prefix + k: v for k, v in _numbers(row).items()}})
        self.logged = max(self.logged, int(row["step"]))

    def last_step(self, keys: set[str]) -> int:
        """The last step the run holds a value of `keys` at, read from its offline files (-1: none); online, the
        server's copy cannot be read here, so None: assume it has what was sent."""
        if self.mode != "offline":
            return None
        try:
            rows = read_wandb_offline(self.run_dir)
        except FileNotFoundError:
            return -1
        return max((int(r["step"]) for r in rows if keys & set(r)), default=-1)

    def close(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Finish the run; offline, also wait (bounded) until its file holds the last step sent: wandb's service
        process may still be writing it after finish() returns, and a resumed run reads that file to know what
        the run already has."""
        self.run.finish()
        if self.mode != "offline" or self.logged < 0:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if max((int(r["step"]) for r in read_wandb_offline(self.run_dir)), default=-1) >= self.logged:
                    return
            except (FileNotFoundError, ValueError):  # not there yet, or its last record half written
                pass
            time.sleep(0.2)


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class Loggers:
    """Every configured sink; `log` sends a metrics row (one step) to each. Closed at the end of the run."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.sinks = [SINKS[name](run_dir, cfg) for name in cfg.loggers]
        self.sent: dict[tuple[int, str], int] = {}  # (sink, stream) -> the last step sent

    def log(self, row: dict, prefix: str = "", stream: str = "metrics") -> None:
        """Send a row (one step) to every sink that has not had this stream's step yet."""
        step = int(row["step"])
        for i, sink in enumerate(self.sinks):
            if step > self.sent.get((i, stream), -1):
                sink.log(row, prefix)
                self.sent[(i, stream)] = step

    def catch_up(self, stream: str, rows: list[dict]) -> None:
        """A resumed run's earlier rows of `stream`: each sink gets those after the last step it holds (a process
        killed before a sink wrote its last rows), and none of them again later."""
        if not rows:
            return
        keys = {k for r in rows for k in _numbers(r)}
        last = max(int(r["step"]) for r in rows)
        for i, sink in enumerate(self.sinks):
            have = sink.last_step(keys)
            for row in rows:
                if int(row["step"]) > (last if have is None else have):
                    sink.log(row)
            self.sent[(i, stream)] = last

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `<run>/tensorboard/`: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a `.wandb` file: LevelDB's log format (32 KiB blocks of checksummed fragments) behind a
    7-byte ':W&B' header. wandb's own Python reader was removed in 0.19; this follows the format it documented."""
    import struct
    import zlib

    block, header = 32768, 7
    data = path.read_bytes()
    if len(data) < header:  # a file just created, its header not yet written
        return
    ident, magic, version = struct.unpack("<4sHB", data[:header])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path.name} is not a W&B run log (header {data[:header]!r})")
    pos, parts = header, []
    while pos + header <= len(data):
        if block - pos % block < header:  # too little room left in this block for a fragment header: padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += block - pos % block
            continue
        payload = data[pos + header:pos + header + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path.name}: checksum mismatch at byte {pos}")
        pos += header + length
        parts.append(payload)
        if kind in (1, 4):  # FULL, LAST
            yield b"".join(parts)
            parts = []


def read_wandb_offline(run_dir: Path) -> list[dict]:
    """The history rows of the offline W&B run in `<run>/wandb/`, read from its `.wandb` logs (one per process
    that wrote to it: a resumed run adds one), oldest first."""
    import json

    from wandb.proto import wandb_internal_pb2

    paths = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    if not paths:
        raise FileNotFoundError(f"no offline W&B run under {run_dir / 'wandb'}")
    rows = []
    for path in paths:
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
