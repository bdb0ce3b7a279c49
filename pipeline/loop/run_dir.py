"""Run folders: where a run writes (config, metrics, samples, checkpoints), how it is found again to resume, how
a user asks it to stop (a STOP file), and how an experiment or a profile starts one afresh. `rollouts.parquet`
holds the sampled rows of every step, rewritten whole after each step so that a crash keeps what was sampled."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, dump_toml


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory; a clear error when there is none."""
    from learner.checkpoint import latest_checkpoint as newest

    found = newest(run_dir)
    if found is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from (set learner.checkpoint_every to save some)")
    return found



def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser() / name
    if (run_dir / "metrics.parquet").exists():
        raise ValueError(f"run directory {run_dir} already holds a run; choose another --run.name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir



def finished(run_dir: Path) -> bool:
    """Whether a run reached its last step in `run_dir` (`run` writes summary.json at the very end)."""
    return (run_dir / "summary.json").is_file()



def restart_run_dir(cfg: Config) -> Path:
    """The run directory of a run that an experiment or a profile (re)starts in full: whatever a run cut off
    there before left behind is removed, and the config is kept beside the results."""
    import shutil

    shutil.rmtree(Path(cfg.run.output_dir).expanduser() / cfg.run.name, ignore_errors=True)
    run_dir = make_run_dir(cfg)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    return run_dir



def write_samples(samples: list[pa.Table], run_dir: Path) -> None:
    tmp = run_dir / "rollouts.parquet.tmp"
    pq.write_table(pa.concat_tables(samples, promote_options="default"), tmp)
    tmp.replace(run_dir / "rollouts.parquet")



def previous_samples(run_dir: Path, up_to_step: int) -> list[pa.Table]:
    path = run_dir / "rollouts.parquet"
    if up_to_step == 0 or not path.exists():
        return []
    import pyarrow.compute as pc

    table = pq.read_table(path)
    return [table.filter(pc.less_equal(table.column("step"), up_to_step))]


STOP_FILE = "STOP"


def stop_requested(run_dir: Path, version: int, log: Callable[[str], None] = print) -> bool:
    """Whether a user asked the run to stop, by creating `run_dir/STOP` (`touch RUN_DIR/STOP`): checked between
    steps; the file is removed, so `probe-rl run --resume RUN_DIR` carries on."""
    stop = run_dir / STOP_FILE
    if not stop.exists():
        return False
    stop.unlink(missing_ok=True)
    log(f"{stop} found: stopping after step {version} with a checkpoint; continue with "
        f"`probe-rl run --resume {run_dir}`")
    return True
