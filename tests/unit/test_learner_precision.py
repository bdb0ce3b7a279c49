"""bf16 training adds its micro-gradients in float32 (learner/learner.py: `Learner.ds_stage`, `_ds_config`).

A learner in bfloat16 at learner.zero_stage = 0 runs DeepSpeed's BF16_Optimizer (stage 0 has no float32
accumulation in DeepSpeed 0.19) with float32 gradient accumulation and reduction. The check is numeric: after 16
micro-batches, the gradient DeepSpeed holds equals the float32 sum of the 16 bf16 micro-gradients (each computed
on its own), and lies far closer to it than a bf16 running sum does. Runs in a subprocess: DeepSpeed's process
group must not outlive the test."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import socket, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.utils import safe_get_full_grad
from learner.learner import Learner
from pipeline.config import LearnerConfig

folder = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
n = 16
learner = Learner(model_path=folder, cfg=LearnerConfig(num_cpus=1, micro_batch_size=1, zero_stage=0), rows_per_step=n,
                  dtype="bfloat16")
learner.setup("127.0.0.1", port)
engine = learner.engine
assert learner.ds_stage == 1 and isinstance(engine.optimizer, BF16_Optimizer), type(engine.optimizer)
assert engine.get_data_types() == (torch.bfloat16, torch.float32), engine.get_data_types()
assert engine.communication_data_type == torch.float32
batches = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(n)]
param = engine.module.model.layers[0].mlp.down_proj.weight
micro = []
for ids in batches:  # each micro-gradient on its own, as DeepSpeed scales it (1 / gradient_accumulation_steps)
    loss = engine.module(input_ids=ids, labels=ids).loss / n
    micro.append(torch.autograd.grad(loss, param)[0])
ref = torch.stack([g.double() for g in micro]).sum(0)
bf16_sum = torch.zeros_like(micro[0])
for g in micro:
    bf16_sum += g
for m, ids in enumerate(batches):
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    if m < n - 1:
        engine.step()
held = safe_get_full_grad(param)
assert held.dtype == torch.float32, held.dtype
err = float((held.double() - ref).abs().max()); bf16_err = float((bf16_sum.double() - ref).abs().max())
scale = float(ref.abs().max())
print(f"max |ref| {scale:.3e}  DeepSpeed's error {err:.3e}  a bf16 running sum's {bf16_err:.3e}")
assert err <= 1e-5 * scale, (err, scale)
assert bf16_err > 30 * max(err, 1e-12 * scale), (err, bf16_err)
engine.step()
print("ok")
"""


def test_bf16_micro_gradients_add_up_in_float32(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout + out.stderr)[-4000:]
