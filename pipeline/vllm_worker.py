"""What probe-rl adds to vLLM's workers: `LLM(worker_extension_cls=...)` mixes this class into each worker, and the
generator calls its methods by name with plain data through `collective_rpc`, so they run wherever vLLM put its
workers (the actor's process or vLLM's engine process) without any code or closure crossing a process boundary.
"""

from __future__ import annotations

EXTENSION = "pipeline.vllm_worker.ProbeRLWorkerExtension"


class ProbeRLWorkerExtension:
    def probe_rl_set_ablation(self, layer: int | None, direction: list[float] | None) -> bool:
        """Project the unit `direction` u out of the residual stream after decoder block `layer` (h - (h.u)u) in
        every forward pass from now on; `layer` None removes it. Returns whether an ablation is on.

        vLLM's decoder blocks hand on (hidden, residual) and the residual stream is their sum (the next block's
        fused add-norm adds them), so the projection of the sum is taken off the residual part."""
        import torch

        from probes.hooks import decoder_layers

        handle = getattr(self, "_probe_rl_ablation", None)
        if handle is not None:
            handle.remove()
            self._probe_rl_ablation = None
        if layer is None:
            return False
        model = self.model_runner.get_model()
        block = decoder_layers(model)[layer]
        param = next(model.parameters())
        u = torch.tensor(direction, dtype=param.dtype, device=param.device)

        def hook(_module, _args, output):
            hidden, residual = output
            return hidden, ablated_residual(hidden, residual, u)

        self._probe_rl_ablation = block.register_forward_hook(hook)
        return True


def ablated_residual(hidden, residual, u):
    """The residual part that makes `hidden + residual` lose its component along the unit vector u (..., H)."""
    return residual - ((hidden + residual) @ u)[..., None] * u
