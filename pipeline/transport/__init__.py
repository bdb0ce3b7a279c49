"""Weights on the move and what probe-rl runs inside vLLM: the wire format, gloo transfer groups and the bounded
broadcast (`weights`); vLLM weight-transfer engines for the object store, gloo and NCCL (`vllm_weights`, registered
as a vLLM plugin); the worker extension (`vllm_worker`) and the probe-reading model loader (`vllm_probes`).
Floor 2: imports floors 0-1 and `probes/`; never `worlds/` or above."""
