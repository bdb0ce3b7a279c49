import pytest

from pipeline.config import load_config
from pipeline.profile import STAGES, arms_of, overhead, write_profile


def _rep(step_s):
    r = {"step_s": step_s, "tokens_per_s": 100.0, "generate_s": 0.1, "score_s": 0.05, "learn_compute_s": 0.2,
         "padding_waste": 0.1, "scorer_utilisation": 0.05 / step_s}
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
    results = {"plain-kl": [_rep(1.0), _rep(2.0)], "probes-kl": [_rep(1.02), _rep(2.1)]}
    med, lo, hi = overhead(results, "kl")
    assert (lo, hi) == (pytest.approx(1.02), pytest.approx(1.05)) and med == pytest.approx(1.035)
    assert overhead(results, "nokl") is None
    text = write_profile(tmp_path, results, load_config()).read_text()
    assert "with KL (probes ride on the reference pass): **1.035** (min 1.020, max 1.050)" in text
    assert (tmp_path / "step_time.png").read_bytes()[:4] == b"\x89PNG"
