"""What probe-rl adds to vLLM's workers: `LLM(worker_extension_cls=...)` mixes this class into each worker, and the
generator calls its methods by name with plain data through `collective_rpc`, so they run wherever vLLM put its
workers (the actor's process or vLLM's engine process) without any code or closure crossing a process boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXTENSION = "pipeline.transport.vllm_worker.ProbeRLWorkerExtension"


class ProbeRLWorkerExtension:
    # --- probes read in the sampling pass (pipeline/transport/vllm_probes.py) -------------------------------------------

    def probe_rl_reads_start(self, weights: list[list[float]], biases: list[float]) -> int:
        """Set the generator-read probes' weights and start recording each model step's scores; returns how many
        probes this worker reads. The hooks were installed by the `probe_rl` model loader, before compilation."""
        from pipeline.transport.vllm_probes import StepLog

        reads = getattr(self.model_runner.get_model(), "probe_rl_reads", None)
        if reads is None:
            raise RuntimeError("this vLLM engine was not loaded with load_format=\"probe_rl\": no probe reads")
        if getattr(self.model_runner, "speculative_config", None) is not None:
            raise ValueError("probes read on the generator need the host's position counts: turn speculative "
                             "decoding off, or read the probes on the scorers")
        reads.set_weights(weights, biases)
        if getattr(self, "_probe_rl_log", None) is None:
            runner = self.model_runner
            log = self._probe_rl_log = StepLog(reads.column_of)
            _around_steps(runner, after=lambda scheduler_output: log.record(runner, scheduler_output, reads))
        return reads.num_probes

    def probe_rl_set_threads(self, n: int) -> int:
        """Compute on `n` threads from now on (pipeline.cores = "phase"; pipeline/cores.py). vLLM's CPU worker
        replaced `torch.set_num_threads` with a no-op; the call beneath it is what sets them."""
        from pipeline.cores import set_threads

        set_threads(n)
        return n

    def probe_rl_slow_steps(self) -> None:
        """Tests (pipeline/faults.py, role "decode_step"): every model step of this worker takes longer, as a large
        model's would, so that a test can act between two of them."""
        from pipeline.faults import maybe_slow_down

        _around_steps(self.model_runner, before=lambda _scheduler_output: maybe_slow_down("decode_step"))

    def probe_rl_set_read_probes(self, weights: list[list[float]], biases: list[float]) -> None:
        """Refit probes: new weights copied into the tensors the compiled hooks read."""
        self.model_runner.get_model().probe_rl_reads.set_weights(weights, biases)

    def probe_rl_take_scores(self, keys: list[str]) -> dict:
        """Scores recorded since the last take for these requests: key -> (positions, per-position scores)."""
        return self._probe_rl_log.take(keys)

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


def _around_steps(runner, before=None, after=None) -> None:
    """Run `before(scheduler_output)` and `after(scheduler_output)` around each of the model runner's steps (its
    `execute_model`, plain Python outside anything vLLM compiles)."""
    execute = runner.execute_model

    def step(scheduler_output, *args, **kwargs):
        if before is not None:
            before(scheduler_output)
        out = execute(scheduler_output, *args, **kwargs)
        if after is not None:
            after(scheduler_output)
        return out

    runner.execute_model = step


def ablated_residual(hidden: torch.Tensor, residual: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The residual part that makes `hidden + residual` lose its component along the unit vector u (..., H)."""
    return residual - ((hidden + residual) @ u)[..., None] * u
