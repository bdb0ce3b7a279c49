"""TensorBoard and W&B (offline) sinks: what is written is what reads back, step by step."""

import math

import pytest

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.loop.loggers import Loggers, read_tensorboard, read_wandb_offline

ROWS = [{"step": s, "rollout/task_reward": 0.1 * s, "learner/kl": 0.01 / s, "learner/probe_score": math.nan,
         "pipeline/restarts": 0, "note": "text is skipped"} for s in (1, 2, 3)]


def test_tensorboard_and_wandb_read_back_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = Loggers(tmp_path, RunConfig(loggers=["tensorboard", "wandb"]))
    for row in ROWS:
        loggers.log(row)
    loggers.log({"step": 3, "hack/auroc_live": 0.9}, "eval/", stream="eval")
    loggers.close()

    tb = read_tensorboard(tmp_path)
    assert [s for s, _ in tb["rollout/task_reward"]] == [1, 2, 3]
    assert [v for _, v in tb["rollout/task_reward"]] == pytest.approx([0.1, 0.2, 0.3])
    assert [v for _, v in tb["learner/kl"]] == pytest.approx([0.01, 0.005, 0.01 / 3])
    assert tb["eval/hack/auroc_live"] == [(3, pytest.approx(0.9))]
    assert "learner/probe_score" not in tb and "note" not in tb  # NaN and text are not scalars to plot

    wb = read_wandb_offline(tmp_path)  # close() waited until wandb's service process had written the last step
    steps = [r for r in wb if "rollout/task_reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["rollout/task_reward"] for r in steps] == pytest.approx([0.1, 0.2, 0.3])
    assert any(r.get("eval/hack/auroc_live") == pytest.approx(0.9) and r["step"] == 3 for r in wb)


def test_a_restarted_or_resumed_run_mirrors_each_step_once(tmp_path, monkeypatch):
    """Metric rows go to Parquet always and to TensorBoard and W&B once per step: steps recomputed after a learner
    restart (the sink truncated back to a checkpoint) and a resumed run's new process (a new sink over the same
    file, the same W&B run continued) are not sent to them again; rows a killed process wrote to Parquet but
    never got to W&B (here: step 4, written to Parquet alone) are sent on resume."""
    from pipeline.loop.metrics import ParquetSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = RunConfig(loggers=["tensorboard", "wandb"])
    loggers = Loggers(tmp_path, cfg)
    sink = ParquetSink(tmp_path / "metrics.parquet", loggers)
    for s in (1, 2, 3):
        sink.log({"step": s, "rollout/task_reward": 0.1 * s})
    sink.truncate(1)  # a learner restart from checkpoint 1: steps 2-3 are recomputed
    for s in (2, 3):
        sink.log({"step": s, "rollout/task_reward": 0.1 * s})
    sink.loggers = None  # killed after Parquet got step 4 and before the loggers did
    sink.log({"step": 4, "rollout/task_reward": 0.4})
    loggers.close()
    loggers = Loggers(tmp_path, cfg)  # resumed from checkpoint 2
    sink = ParquetSink(tmp_path / "metrics.parquet", loggers)
    sink.truncate(2)
    for s in (3, 4, 5):
        sink.log({"step": s, "rollout/task_reward": 0.1 * s})
    loggers.close()
    assert [r["step"] for r in sink.rows] == [1, 2, 3, 4, 5]
    assert [s for s, _ in read_tensorboard(tmp_path)["rollout/task_reward"]] == [1, 2, 3, 4, 5]
    wb = [r["step"] for r in read_wandb_offline(tmp_path) if "rollout/task_reward" in r]
    assert wb == [1, 2, 3, 4, 5]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2  # one W&B run, continued


def test_a_logger_whose_package_is_missing_is_refused_at_load(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = tmp_path / "c.toml"
    path.write_text('[run]\nloggers = ["wandb"]\n')
    with pytest.raises(ConfigError, match=r"needs wandb, which is not installed: pip install wandb"):
        load_config(path)
