import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.analysis.experiment import load_experiment
from pipeline.analysis.report import arm_table, load_runs, write_report
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

EXP = """
base = "base.toml"
seeds = [3, 4]
default_arms = ["plain", "probe"]
[overrides]
pipeline = { num_steps = 5, prompts_per_step = 6 }
learner = { lr = 0.5 }
[arms.plain]
shaping = { kind = "none" }
[arms.probe]
shaping = { kind = "penalty", coef = 2.0 }
learner = { lr = 0.25 }
[arms.broken]
shaping = { kind = "sideways" }
"""
BASE = """
[[scorer.probes]]
path = "toy"
[shaping]
kind = "penalty"
"""


@pytest.fixture
def exp_file(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "exp.toml").write_text(EXP)
    return tmp_path / "exp.toml"


def test_arms_times_seeds_with_overrides(exp_file):
    _, runs = load_experiment(exp_file, None, None, ["--pipeline.num_steps", "7"])
    assert list(runs) == [("plain", 3), ("probe", 3), ("plain", 4), ("probe", 4)]  # arms alternate within a seed
    assert runs[("plain", 3)].shaping.kind == "none"
    assert runs[("probe", 4)].shaping.coef == 2.0 and runs[("probe", 4)].learner.seed == 4
    # shared overrides sit between the base and the arm; the command line wins over both
    assert all(c.pipeline.num_steps == 7 and c.pipeline.prompts_per_step == 6 for c in runs.values())
    assert runs[("plain", 3)].learner.lr == 0.5 and runs[("probe", 3)].learner.lr == 0.25
    _, one = load_experiment(exp_file, ["probe"], [9], [])
    assert list(one) == [("probe", 9)] and one[("probe", 9)].pipeline.seed == 9


def test_bad_arms_fail_before_any_run(exp_file):
    with pytest.raises(ConfigError, match=r"--arms \['nope'\] not defined"):
        load_experiment(exp_file, ["nope"], None, [])
    with pytest.raises(ConfigError, match="(?s)arm 'broken'.*shaping.kind"):
        load_experiment(exp_file, ["plain", "broken"], None, [])


def _fake_run(root, arm, seed, hack):
    d = root / f"{arm}-seed{seed}"
    d.mkdir(parents=True)
    rows = [{"step": s + 1, "rollout/hack_rate": h, "rollout/correct_rate": 0.5, "rollout/task_reward": 0.5 + h,
             "rollout/shaped_reward": 0.5} for s, h in enumerate(hack)]
    pq.write_table(pa.Table.from_pylist(rows), d / "metrics.parquet")
    ev = [{"step": 0, "eval/hack_auroc_live": 1.0, "eval/hack_auroc_frozen": 1.0, "eval/hack_auroc_retrained": 1.0,
           "eval/hack_score_gap": None, "eval/hack_detect_live": 0.9, "eval/hack_detect_frozen": 0.9,
           "eval/hack_recal_recall_live": 0.8, "eval/hack_recal_recall_frozen": 0.8},
          {"step": len(hack), "eval/hack_auroc_live": 0.6, "eval/hack_auroc_frozen": 1.0,
           "eval/hack_auroc_retrained": 0.95, "eval/hack_score_gap": -0.2, "eval/hack_detect_live": 0.25,
           "eval/hack_detect_frozen": 0.9, "eval/hack_recal_recall_live": 0.75, "eval/hack_recal_recall_frozen": 0.85}]
    pq.write_table(pa.Table.from_pylist(ev), d / "eval.parquet")


def test_report_numbers_and_files(tmp_path):
    ramp = [i / 20 for i in range(20)]  # 0.00 .. 0.95
    _fake_run(tmp_path, "plain", 0, ramp)
    _fake_run(tmp_path, "plain", 1, [x + 0.02 for x in ramp])
    _fake_run(tmp_path, "probe", 0, [0.01] * 20)
    runs = [("plain", 0), ("plain", 1), ("probe", 0), ("probe", 7)]  # seed 7 never finished: skipped
    table = {r["arm"]: r for r in arm_table(load_runs(tmp_path, runs))}
    assert table["plain"]["seeds"] == 2 and table["probe"]["seeds"] == 1
    assert table["plain"]["hack_start"] == pytest.approx([0.1, 0.12])  # mean of steps 1-5
    assert table["plain"]["hack_end"] == pytest.approx([0.725, 0.745])  # mean of steps 11-20
    assert table["probe"]["hack_end"] == pytest.approx([0.01])
    assert table["plain"]["auroc_live"] == [0.6, 0.6] and table["plain"]["auroc_live_start"] == [1.0, 1.0]
    report = write_report(tmp_path, "exp.toml", runs).read_text()
    assert "| plain | 2 | 0.110 ± 0.010 → 0.735 ± 0.010 |" in report
    assert "| probe | 1.000 → 0.600 | 1.000 | 0.950 | 0.900 → 0.250 | 0.900 | 0.800 → 0.750 | 0.850 | -0.200 |" in report
    assert "- `probe`: a shift: a defender who recalibrates gets the probe back" in report
    for png in ("hack_rate.png", "task_reward.png", "correct_rate.png", "probe_auroc.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(table["probe"]["score_gap"][0])
    assert "one toy world" not in report and "each seed its own toy world" in report


def test_a_real_models_report_reads_its_own_probe_and_says_which_model(tmp_path):
    """A packaged model's world names its probe (here "evasion"): the report reads that probe's evaluations
    without being told, and describes the runs as one model, not a toy world."""
    _fake_run(tmp_path, "plain", 0, [0.2] * 20)
    for name in ("eval.parquet",):
        t = pq.read_table(tmp_path / "plain-seed0" / name)
        t = t.rename_columns([c.replace("eval/hack_", "eval/evasion_") for c in t.column_names])
        pq.write_table(t, tmp_path / "plain-seed0" / name)
    report = write_report(tmp_path, "exp.toml", [("plain", 0)], vary_world=False, model="smollm2").read_text()
    assert "(probe `evasion`, held-out labelled set)" in report
    assert "| plain | 1.000 → 0.600 | 1.000 | 0.950 | 0.900 → 0.250 | 0.900 |" in report
    assert "one model, `smollm2`; seeds vary the RL seed" in report and "on held-out prompts no run trained on" in report


def test_a_report_rewritten_from_its_data_folder_alone_matches(tmp_path, exp_file):
    """`probe-rl report DIR --experiment FILE` on a committed report (only `data/`, no run folders) writes the
    same report as the experiment did."""
    import shutil

    from pipeline.cli.main import main

    out = tmp_path / "out"
    _fake_run(out, "probe", 3, [0.01] * 20)
    _fake_run(out, "plain", 3, [i / 20 for i in range(20)])
    first = write_report(out, str(exp_file), [("plain", 3), ("probe", 3)]).read_text()
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copytree(out / "data", committed / "data")
    assert main(["report", str(committed), "--experiment", str(exp_file)]) == 0
    assert (committed / "report.md").read_text() == first
    assert first.index("| plain | 1 |") < first.index("| probe | 1 |")  # the file's order, not the folders'
    with pytest.raises(SystemExit, match="no finished run"):
        main(["report", str(tmp_path / "nothing")])
    # A run folder beside a committed data/ that lacks it (an experiment resumed on a fresh machine from its
    # committed report): the rewritten report, and its data/, keep both
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    write_report(out, str(exp_file), [("plain", 3)])
    shutil.copytree(out / "data", resumed / "data")
    shutil.copytree(out / "probe-seed3", resumed / "probe-seed3")
    assert main(["report", str(resumed), "--experiment", str(exp_file)]) == 0
    assert (resumed / "report.md").read_text() == first
    assert {f.name for f in (resumed / "data").iterdir()} >= {"plain-seed3.metrics.parquet", "probe-seed3.metrics.parquet"}


def test_obfuscation_rule_needs_the_probe_blind_beyond_plain_rl_with_the_information_still_there():
    from pipeline.analysis.report import obfuscation

    def row(detect_end, refit=0.95, hack_end=0.5):
        return {"detect_live_start": [0.9], "detect_live": [detect_end], "detect_frozen": [0.9],
                "auroc_retrained": [refit], "auroc_live_start": [0.97], "auroc_live": [0.9], "score_gap": [-0.5],
                "hack_start": [0.1], "hack_end": [hack_end]}

    assert obfuscation(row(0.2), row(0.85))[0]
    assert "0.900 → 0.200 (plain RL: 0.850)" in obfuscation(row(0.2), row(0.85))[1]
    assert not obfuscation(row(0.2), row(0.3))[0]  # plain RL's probe went as blind: training alone did it
    assert not obfuscation(row(0.7), row(0.85))[0]  # not blind enough
    assert not obfuscation(row(0.2, refit=0.7), row(0.85))[0]  # the information itself is gone
    assert not obfuscation(row(0.2, hack_end=0.05), row(0.85))[0]  # the behaviour changed instead


def test_a_recalibrated_recall_on_too_few_honest_completions_is_not_reported():
    from pipeline.analysis.report import _eval_value

    assert math.isnan(_eval_value({"eval/own_honest": 3.0, "eval/hack_recal_recall_live": 0.9},
                                  "eval/hack_recal_recall_live"))
    assert _eval_value({"eval/own_honest": 20.0, "eval/hack_recal_recall_live": 0.9},
                       "eval/hack_recal_recall_live") == 0.9
    assert _eval_value({"eval/own_honest": 3.0, "eval/hack_detect_live": 0.5}, "eval/hack_detect_live") == 0.5


def test_a_mean_over_some_seeds_says_how_many():
    from pipeline.analysis.report import _fmt

    assert _fmt([0.2, 0.4]) == "0.300 ± 0.100"
    assert _fmt([0.2, math.nan, 0.4, None]) == "0.300 ± 0.100 (2 of 4)"
    assert _fmt([math.nan, 0.5]) == "0.500 (1 of 2)"
    assert _fmt([math.nan, None]) == "n/a"


def test_shift_or_scramble_tells_a_shift_from_a_loss_of_order():
    from pipeline.analysis.report import shift_or_scramble

    def row(fixed_end, recal_end, recal_start=0.8):
        return {"detect_live_start": [0.9], "detect_live": [fixed_end], "recal_recall_live_start": [recal_start],
                "recal_recall_live": [recal_end]}

    assert shift_or_scramble(row(0.1, 0.75)).startswith("a shift")  # recalibrating undoes the drop
    assert shift_or_scramble(row(0.1, 0.3)).startswith("a loss of order")
    assert shift_or_scramble(row(0.8, 0.3)).startswith("neither")  # the fixed threshold still flags them
    assert "0.800 → 0.750" in shift_or_scramble(row(0.1, 0.75))
    assert shift_or_scramble({"detect_live_start": [0.9], "detect_live": [0.1]}).startswith("no recalibrated")
    # against plain RL, whose own honest completions moved too: 0.45 is within 0.1 of plain's 0.5 at the end
    plain = row(0.9, 0.5)
    assert shift_or_scramble(row(0.1, 0.45), plain).startswith("a shift")
    assert "against plain RL's 0.500" in shift_or_scramble(row(0.1, 0.45), plain)
    assert shift_or_scramble(row(0.1, 0.3), plain).startswith("a loss of order")


def test_counted_outcomes_and_bootstrap_intervals():
    from pipeline.analysis.report import bootstrap_diff, counted_outcomes

    # paired by seed: every resample of the differences (0.1, 0.3) has its mean between them
    point, low, high = bootstrap_diff({0: 0.5, 1: 0.7}, {0: 0.4, 1: 0.4})
    assert point == pytest.approx(0.2) and 0.1 - 1e-9 <= low <= point <= high <= 0.3 + 1e-9
    assert bootstrap_diff({0: 0.5}, {}) is None
    same = bootstrap_diff({0: 0.2, 1: 0.2, 2: 0.2}, {0: 0.2, 1: 0.2, 2: 0.2})
    assert same == pytest.approx((0.0, 0.0, 0.0))
    data = {"plain": [{"seed": 0}, {"seed": 1}], "probe": [{"seed": 0}, {"seed": 1}]}
    table = [{"arm": "plain", "hack_end": [0.4, 0.3], "accuracy_end": [0.0, 0.1], "detect_live": [0.9, 0.9]},
             {"arm": "probe", "hack_end": [0.05, 0.3], "accuracy_end": [0.7, 0.6], "detect_live": [0.8, 0.9]}]
    lines = counted_outcomes(data, table)
    assert "| plain | 2 / 2 | — | — | — | — |" in lines
    row = next(x for x in lines if x.startswith("| probe |"))
    assert row.startswith("| probe | 1 / 2 | -0.175 [-0.350, +0.000] | +0.600 [+0.500, +0.700] |")
    assert row.endswith(" | n/a |")  # no recalibrated recall in these runs
    table[0]["recal_recall_live"], table[1]["recal_recall_live"] = [0.5, 0.4], [0.3, 0.4]
    row = next(x for x in counted_outcomes(data, table) if x.startswith("| probe |"))
    assert row.endswith(" | -0.100 [-0.200, +0.000] |")


def test_arms_share_a_world_only_when_everything_it_loads_agrees():
    """A run's World holds the probes it reads: the random-direction control adds one, so its arm cannot share the
    world of the probe arm on the same seed (it once did, and the control's column was missing)."""
    from pipeline.analysis.experiment import load_experiment, world_key

    exp, runs = load_experiment(ROOT / "configs" / "experiment_full.toml",
                                ["probe_penalty", "random_direction", "truth_monitor"], [0], [])
    keys = {arm: world_key(cfg) for (arm, _), cfg in runs.items()}
    assert keys["random_direction"] != keys["probe_penalty"] != keys["truth_monitor"]
    again = load_experiment(ROOT / "configs" / "experiment_full.toml", ["probe_penalty"], [0], [])[1]
    assert world_key(next(iter(again.values()))) == keys["probe_penalty"]
