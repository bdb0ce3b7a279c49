import pytest

from pipeline.analysis.profile import STAGES, arms_of, overhead, write_profile
from pipeline.config import load_config


def _rep(step_s, busy=1.0):
    r = {"step_s": step_s, "tokens_per_s": 100.0, "generate_s": 0.1, "score_s": 0.05, "learn_compute_s": 0.2,
         "padding_waste": 0.1, "scorer_utilisation": 0.05 / step_s, "completion_len": 5.0, "busy_generator": busy,
         "busy_scorer": 0.0, "busy_learner": 0.0, "busy_total": busy, "held_total": 4 * step_s}
    r.update({f"{s}_s": step_s / len(STAGES) for s in STAGES})
    return r


def test_arms_differ_only_in_probes_and_kl():
    arms = arms_of(load_config(), "both")
    assert set(arms) == {"plain-kl", "probes-kl", "plain-nokl", "probes-nokl"}
    assert arms["plain-kl"].scorer.probes == [] and arms["plain-kl"].shaping.kind == "none"
    assert len(arms["probes-kl"].scorer.probes) == 1 and arms["probes-kl"].shaping.kind == "penalty"
    assert arms["probes-nokl"].learner.kl_coef == 0 == arms["plain-nokl"].learner.kl_coef
    assert arms["plain-kl"].pipeline == arms["probes-kl"].pipeline  # same steps, prompts, seed
    assert list(arms_of(load_config(), "off")) == ["plain-nokl", "probes-nokl"]
    with pytest.raises(ValueError, match="needs scorer.probes"):
        arms_of(load_config(overrides={"scorer": {"probes": []}, "shaping": {"kind": "none"}}), "on")


def test_overhead_is_paired_by_repeat_and_reported(tmp_path):
    results = {"plain-kl": [_rep(1.0), _rep(2.0)], "probes-kl": [_rep(1.02, 1.01), _rep(2.1, 1.03)]}
    med, lo, hi = overhead(results, "kl")
    assert (lo, hi) == (pytest.approx(1.02), pytest.approx(1.05)) and med == pytest.approx(1.035)
    assert overhead(results, "nokl") is None
    text = write_profile(tmp_path, results, load_config()).read_text()
    assert overhead(results, "kl", "busy_total") == (pytest.approx(1.02), pytest.approx(1.01), pytest.approx(1.03))
    assert ("with KL (probes ride on the reference pass): wall time **1.035** (1.020-1.050); busy resource-seconds "
            "**1.020** (1.010-1.030)") in text
    assert (tmp_path / "step_time.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_reads_the_step_wall_time_and_counts_resource_seconds_per_role():
    from pipeline.analysis.profile import _summarise

    cfg = load_config(overrides={"generator": {"num_workers": 2, "num_cpus": 1.0}, "scorer": {"num_cpus": 0.5},
                                 "learner": {"num_ranks": 2, "num_cpus": 1.0}})
    rows = [{"time/step_wall_s": w, "time/generate_wall_s": 1.0, "time/generate_busy_s": 1.8,
             "time/score_busy_s": 0.4, "time/learn_compute_s": 0.5, "rollout/tokens_per_s": 10.0,
             "scorer/padding_waste": 0.0, "rollout/completion_len": 7.0, "time/stage/learn_s": 0.6} for w in (2.0, 3.0)]
    m = _summarise(rows, cfg)
    assert m["step_s"] == 2.5 and m["learn_s"] == 0.6
    assert m["busy_generator"] == pytest.approx(1.8) and m["busy_scorer"] == pytest.approx(0.2)
    assert m["busy_learner"] == pytest.approx(0.5 * 2) and m["busy_total"] == pytest.approx(3.0)
    held = 2 * 1.0 + cfg.scorer.num_workers * 0.5 + 2 * 1.0
    assert m["held_total"] == pytest.approx(held * 2.5)


def test_a_finished_run_is_read_back_a_cut_off_one_is_redone_and_another_configs_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.analysis.profile import _complete
    from pipeline.config import dump_toml

    cfg = arms_of(load_config(None, ["--pipeline.num_steps", "3"]), "on")["probes-kl"]
    run_dir = tmp_path / "probes-kl-r0"
    assert not _complete(run_dir, cfg, print)  # nothing there yet
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(dump_toml(cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"output_dir": "elsewhere"})})))  # the folder may have moved: only the run section differs
    logs = []
    for steps, complete in ((2, False), (3, True)):
        pq.write_table(pa.table({"step": list(range(1, steps + 1))}), run_dir / "metrics.parquet")
        if complete:
            (run_dir / "summary.json").write_text("{}")  # what `run` writes after its last step
        assert _complete(run_dir, cfg, logs.append) is complete
    assert logs == ["profile: probes-kl-r0 was cut off before its last step; it is run again"]
    other = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"kl_coef": 0.5})})
    with pytest.raises(ValueError, match="holds a run of another config"):
        _complete(run_dir, other, print)
    (run_dir / "config.toml").unlink()
    with pytest.raises(ValueError, match="new --out folder"):
        _complete(run_dir, cfg, print)


def test_a_restarted_run_dir_holds_only_its_config_and_a_run_is_finished_once_its_summary_is_written(tmp_path):
    """The two pieces an experiment and a profile resume with (pipeline.loop.run_dir)."""
    from pipeline.config import dump_toml
    from pipeline.loop.run_dir import finished, restart_run_dir

    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "arm-r0"])
    cut_off = tmp_path / "arm-r0"
    (cut_off / "checkpoints" / "step_000001").mkdir(parents=True)
    (cut_off / "metrics.parquet").write_text("partial")
    assert not finished(cut_off)
    run_dir = restart_run_dir(cfg)
    assert run_dir == cut_off and sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "config.toml"]
    assert (run_dir / "config.toml").read_text() == dump_toml(cfg)
    (run_dir / "summary.json").write_text("{}")
    assert finished(run_dir)


def test_the_core_sharing_arms_and_their_floor(tmp_path):
    """profile --cores: phase (threads follow the phase), sync (max_staleness 0, reserved) and colocated arms beside
    the probes arm, and the report's floor: work (busy seconds x threads) over the cores, and s/step against it."""
    arms = arms_of(load_config(), "on", cores=True)
    assert list(arms) == ["plain-kl", "probes-kl", "phase-kl", "sync-kl", "colocated-kl"]
    assert arms["phase-kl"].pipeline.cores == "phase" and arms["phase-kl"].pipeline.max_staleness == 1
    assert arms["sync-kl"].pipeline.max_staleness == 0 and arms["sync-kl"].pipeline.cores == "reserved"
    assert arms["colocated-kl"].pipeline.colocate and arms["colocated-kl"].pipeline.cores == "phase"
    assert arms["colocated-kl"].scorer == arms["probes-kl"].scorer  # the same probes, read the same way

    def rep(step_s, work, threads):
        r = _rep(step_s)
        r.update(work_total=work, cores=2.0, threads_generator=threads, threads_scorer=threads,
                 threads_learner=threads)
        return r

    results = {"plain-kl": [_rep(1.0)], "probes-kl": [rep(3.0, 4.0, 1)], "sync-kl": [rep(4.0, 4.0, 1)],
               "colocated-kl": [rep(2.5, 4.6, 2)]}
    text = write_profile(tmp_path, results, load_config()).read_text()
    assert "## Sharing the cores (kl)" in text
    # colocated: 3.0 / 2.5 = 1.2x the disaggregated steps/s; floor 4.6 / 2 = 2.3 s, 2.5 / 2.3 = 1.087; 2.5 / 2.0
    assert ("| colocated-kl: colocated: synchronous, every phase on every core | 2.50 (2.50-2.50) | **1.200** "
            "(1.200-1.200) | 2.00 / 2.00 / 2.00 | 2.30 | **1.087** (1.087-1.087) | 1.250 |") in text


def test_the_generation_mode_arms_and_their_overlap_limit(tmp_path):
    """profile --in-flight --continuous: the probes arm with weights landing mid-generation and with generators
    that never wait, and the report's modes table: steps/s against between steps per repeat pair, idle shares,
    token staleness, and s/step against the overlap limit (the slowest role's busy seconds per worker)."""
    from pipeline.analysis.profile import _summarise

    arms = arms_of(load_config(), "on", in_flight=True, continuous=True)
    assert list(arms) == ["plain-kl", "probes-kl", "inflight-kl", "continuous-kl"]
    assert arms["continuous-kl"].generator.update_mode == "continuous"
    assert arms["continuous-kl"].pipeline == arms["probes-kl"].pipeline  # the same staleness bound

    cfg = load_config(overrides={"generator": {"num_workers": 2}})
    rows = [{"time/step_wall_s": 4.0, "time/generate_wall_s": 3.0, "time/generate_busy_s": 6.0,
             "time/score_busy_s": 1.0, "time/learn_compute_s": 2.0, "rollout/tokens_per_s": 10.0,
             "rollout/tokens": 800.0, "scorer/padding_waste": 0.0, "rollout/completion_len": 7.0,
             "rollout/token_staleness_mean": 0.5, "rollout/token_staleness_max": s} for s in (1.0, 0.0)]
    m = _summarise(rows, cfg)
    # per worker: generators 6 / 2 = 3 s, scorer 1 s, learner 2 s: the limit is 3 s (the generators)
    assert m["limit_s"] == 3.0 and m["per_worker_generator"] == 3.0 and m["per_worker_learner"] == 2.0
    assert m["idle_frac_generator"] == pytest.approx(0.25) and m["idle_frac_learner"] == pytest.approx(0.5)
    assert m["tokens_per_step_s"] == 200.0 and m["token_staleness"] == 0.5 and m["token_staleness_max"] == 1.0

    def rep(step_s):
        r = _rep(step_s)
        r.update({k: m[k] for k in m if k.startswith(("per_worker_", "limit", "idle_frac", "token", "tokens_per"))})
        return r

    results = {"plain-kl": [_rep(1.0)], "probes-kl": [rep(6.0)], "inflight-kl": [rep(6.0)],
               "continuous-kl": [rep(4.0)]}
    text = write_profile(tmp_path, results, load_config()).read_text()
    assert "## Generation modes (kl)" in text
    # continuous: 6.0 / 4.0 = 1.5x between steps' steps/s; 4.0 / 3.0 = 1.33 of the limit
    assert "| continuous | 4.00 (4.00-4.00) | **1.50** (1.50-1.50) | 200 | 25% | 50% | 0.50, 1 | 3.00 (generator) | 1.33 |" in text
    assert "| between steps | 6.00 (6.00-6.00) | **1.00** (1.00-1.00) |" in text
