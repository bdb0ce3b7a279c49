"""benchmarks/bench_checkpoint.py and bench_handoff.py, run here on a CPU with a tiny shape.

bench_checkpoint is also the learner-level test of exact recovery in every precision: a learner (DeepSpeed, the
learner actor's code) steps, checkpoints, steps once more; a fresh learner restores the checkpoint and takes the
same step; the two must end with equal weights, bit for bit. In bf16 that needs the fp32 master weights and
Adam's moments in the checkpoint (DeepSpeed keeps them in its own wrappers at every ZeRO stage)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("dtype,zero", [("bfloat16", 0), ("bfloat16", 3), ("float32", 0)])
def test_a_restored_learner_steps_exactly_like_the_one_that_never_stopped(tmp_path, dtype, zero):
    out = _run("bench_checkpoint.py", ["--model", "tiny", "--device", "cpu", "--dtype", dtype, "--zero-stage",
                                       str(zero), "--steps", "2", "--rows", "4", "--tokens", "48",
                                       "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    row = pq.read_table(tmp_path / "out" / "checkpoint-tiny.parquet").to_pylist()[0]
    assert row["tensors"] == 39 and row["tensors_equal"] == 39, row
    assert re.search(r"39 of 39 tensors equal", out.stdout)
    folder = tmp_path / "ckpt" / "step_000002"
    with safe_open(str(folder / "optimizer" / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
        kinds = {k.split("/")[0] for k in keys}
        assert {"exp_avg", "exp_avg_sq", "rng"} <= kinds
        # fp32 masters exactly when the model trains in a lower precision
        assert ("master" in kinds) == (dtype != "float32")
        if dtype != "float32":
            master = f.get_tensor("master/model.norm.weight")
            assert str(master.dtype) == "torch.float32"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor("model.norm.weight").dtype) == f"torch.{dtype}"


def test_bench_handoff_host_path_delivers_equal_weights_on_a_cpu(tmp_path):
    out = _run("bench_handoff.py", ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "2",
                                    "--out", str(tmp_path)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = pq.read_table(tmp_path / "handoff.parquet").to_pylist()
    assert [r["case"] for r in rows] == ["host copy (shared memory)"]
    tiny_bytes = 4 * sum(  # benchmarks/bench_handoff.py's TINY: 4 layers, hidden 128, ffn 384, vocab 1024
        [1024 * 128 * 2, 128] + [128 * 128 * 4 + 3 * 128 * 384 + 2 * 128] * 4)
    assert rows[0]["bytes"] == tiny_bytes and rows[0]["seconds"] > 0
