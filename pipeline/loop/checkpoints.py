"""The driver's side of a checkpoint: the rollouts already launched when it was taken, and pruning.

The learner writes `checkpoints/step_v/` (learner/checkpoint.py). Beside it the driver writes, first,
`step_v.inflight.parquet`: the scored rollouts of the steps launched before checkpoint v was taken, which
came from weight versions up to v and are exactly what an uninterrupted run trains on next; with
`scorer.retrain_every`, `step_v.probes.safetensors` (the probes refit so far) and `step_v.refit.parquet` (the
rollouts the next refit will also use). The learner's state file is written after them, so a checkpoint that
looks complete always has them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STEP = "inflight_step"  # the step a row's rollouts belong to


def inflight_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".inflight.parquet")


def write_inflight(run_dir: Path, version: int, flights: list[tuple[int, pa.Table, list, list]]) -> None:
    """(step, scored table, generator stats, scorer stats) of each launched step, beside checkpoint `version`."""
    path = inflight_path(run_dir / "checkpoints" / f"step_{version:06d}")
    tables = [t.add_column(0, STEP, pa.array([step] * t.num_rows, pa.int64())) for step, t, _, _ in flights]
    stats = {str(step): {"generate": [asdict(g) for g in gen], "score": [asdict(s) for s in score]}
             for step, _, gen, score in flights}
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.table({STEP: pa.array([], pa.int64())})
    table = table.replace_schema_metadata({b"probe_rl_stats": json.dumps(stats).encode()})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_inflight(checkpoint: Path) -> list[tuple[int, pa.Table, list, list]]:
    """What `write_inflight` wrote for this checkpoint, in step order; [] when it holds none."""
    import pyarrow.compute as pc

    from actors.generator import GenerateStats
    from actors.scorer import ScoreStats

    path = inflight_path(Path(checkpoint))
    if not path.exists():
        return []
    table = pq.read_table(path)
    stats = json.loads(table.schema.metadata[b"probe_rl_stats"])
    out = []
    for step in sorted(int(s) for s in stats):
        rows = table.filter(pc.equal(table.column(STEP), step)).drop_columns([STEP]).replace_schema_metadata(None)
        out.append((step, rows, [GenerateStats(**g) for g in stats[str(step)]["generate"]],
                    [ScoreStats(**s) for s in stats[str(step)]["score"]]))
    return out


def refit_paths(checkpoint: Path) -> tuple[Path, Path]:
    return (checkpoint.with_name(checkpoint.name + ".probes.safetensors"),
            checkpoint.with_name(checkpoint.name + ".refit.parquet"))


def write_refit(run_dir: Path, version: int, probes: dict[str, dict], window: list[tuple[pa.Table, np.ndarray]]
                ) -> None:
    """The probes refit so far (name -> {"weight", "bias"}) and the refit window (rollouts, labels per row),
    beside checkpoint `version`."""
    from safetensors.torch import save_file

    tensors_path, window_path = refit_paths(run_dir / "checkpoints" / f"step_{version:06d}")
    tensors = {f"{name}/{key}": t.detach().float().cpu().contiguous() for name, ts in probes.items()
               for key, t in ts.items()}
    tmp = tensors_path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(tensors_path)
    tables = [t.append_column("refit_label", pa.array(y, pa.int64())).add_column(0, "refit_slot",
                                                                                pa.array([i] * t.num_rows, pa.int64()))
              for i, (t, y) in enumerate(window)]
    table = pa.concat_tables(tables) if tables else pa.table({"refit_slot": pa.array([], pa.int64())})
    tmp = window_path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(window_path)


def read_refit(checkpoint: Path | None) -> tuple[dict[str, dict], list[tuple[pa.Table, np.ndarray]]]:
    """What `write_refit` wrote for this checkpoint: ({} and [] when it holds none, or for no checkpoint)."""
    import pyarrow.compute as pc
    from safetensors import safe_open

    if checkpoint is None:
        return {}, []
    tensors_path, window_path = refit_paths(Path(checkpoint))
    probes: dict[str, dict] = {}
    if tensors_path.exists():
        with safe_open(str(tensors_path), framework="pt") as f:
            for key in f.keys():
                name, part = key.rsplit("/", 1)
                probes.setdefault(name, {})[part] = f.get_tensor(key)
    window = []
    if window_path.exists():
        table = pq.read_table(window_path)
        if table.num_rows:
            for slot in sorted(set(table.column("refit_slot").to_pylist())):
                rows = table.filter(pc.equal(table.column("refit_slot"), slot))
                labels = rows.column("refit_label").to_numpy()
                window.append((rows.drop_columns(["refit_slot", "refit_label"]).replace_schema_metadata(None), labels))
    return probes, window


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (0: keep all), with their rollouts."""
    from learner.checkpoint import STATE_FILE

    if not keep:
        return
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob(f"step_*/{STATE_FILE}"))
    for old in done[:-keep]:
        inflight_path(old).unlink(missing_ok=True)
        for path in refit_paths(old):
            path.unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
