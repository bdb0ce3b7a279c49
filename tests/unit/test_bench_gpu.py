"""benchmarks/bench_gpu.py, the script that measures scorer and learner throughput on a GPU, run here on a CPU
with a tiny shape: every case runs through the real scorer and learner code and the cases agree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.analysis.cost import Arch, forward_flops_per_token

ROOT = Path(__file__).resolve().parents[2]
TINY = Arch("tiny", 4, 128, 384, 1024, 2, 2, 64)  # benchmarks/bench_gpu.py's TINY


def test_bench_gpu_runs_every_case_on_a_cpu_and_the_cases_agree(tmp_path):
    seqs, tokens, micro = 4, 64, 2
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--model", "tiny", "--device", "cpu",
                          "--dtype", "float32", "--seqs", str(seqs), "--tokens", str(tokens), "--micro-batch",
                          str(micro), "--repeats", "1", "--out", str(tmp_path / "out")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the fused pass's reference log-probs equal reference-only's, its probe scores the truncated pass's
    diffs = [float(x) for x in re.findall(r"(?:max \|diff\||probe scores:) ([0-9.e+-]+)", out.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out.stdout
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    speed = {r["case"]: r for r in rows if r["kind"] == "throughput"}
    assert set(speed) == {"scorer: reference only", "scorer: reference + probe (fused)",
                          "scorer: probe only, truncated", "forward: unhooked", "forward: hooked",
                          "learner: micro-step (forward + backward)"}
    assert all(r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"]) for r in speed.values())
    assert speed["learner: micro-step (forward + backward)"]["tokens"] == micro * tokens
    assert speed["scorer: reference only"]["tokens"] == seqs * tokens
    full = forward_flops_per_token(TINY, tokens / 2)
    assert speed["scorer: reference only"]["flops_per_token"] == pytest.approx(full)
    assert speed["learner: micro-step (forward + backward)"]["flops_per_token"] == pytest.approx(3 * full)
    ratios = {r["case"]: r for r in rows if r["kind"] == "ratio"}
    dots = 2 * TINY.hidden * (tokens - tokens // 4) / tokens
    cut = forward_flops_per_token(TINY, tokens / 2, layers=TINY.layers // 2 + 1, lm_head=False)
    assert ratios["truncated / full scorer pass time"]["predicted_ratio"] == pytest.approx((cut + dots) / full)
    assert all(r["ratio"] > 0 for r in ratios.values())
    assert "| tiny | scorer: probe only, truncated |" in out.stdout
