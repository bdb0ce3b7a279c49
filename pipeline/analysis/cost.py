"""Cost model: FLOPs and memory of one RL step per stage, and what probes add, at any model size.

Counts matmul FLOPs of a Llama-style decoder (GQA attention, SwiGLU MLP, untied LM head):
generation (prefill once per prompt, decode per completion token), the scorer/reference pass, the
learner (forward + backward = 3x forward), and the probe work: with a KL term the probes ride on the
reference pass and add only their dot products; without KL the probe arm pays a pass truncated after
the deepest probed layer, which plain RLHF does not run at all. Seconds are estimated from FLOPs with a
per-stage utilisation (decode is memory-bound, so its utilisation is far lower than the others').
Pure arithmetic: `probe-rl cost` prints it, `probe-rl profile` checks it against measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden  # + two RMSNorm weights

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden


PEAK_FLOPS = 790e12  # the per-GPU peak (dense bf16 FLOP/s) the time estimates assume unless told otherwise

PRESETS = {
    "toy": Arch("toy (probe-rl)", 4, 128, 256, 64, 2, 2, 64),
    "0.5b": Arch("0.5B (Qwen2.5-0.5B shape)", 24, 896, 4864, 151936, 14, 2, 64),
    "7b": Arch("7B (Qwen2.5-7B shape)", 28, 3584, 18944, 152064, 28, 4, 128),
    "70b": Arch("70B (Llama-3-70B shape)", 80, 8192, 28672, 128256, 64, 8, 128),
    "405b": Arch("405B (Llama-3.1-405B shape)", 126, 16384, 53248, 128256, 128, 8, 128),
}


@dataclass(frozen=True)
class Workload:
    prompts: int = 64
    group: int = 8
    prompt_len: int = 256
    completion_len: int = 1024
    probe_layers: tuple[int, ...] = ()  # empty: the middle layer
    num_probes: int = 1
    kl: bool = True
    bytes_per_param: int = 2

    @property
    def sequences(self) -> int:
        return self.prompts * self.group


@dataclass(frozen=True)
class Utilisation:
    """Fraction of peak FLOP/s each stage reaches, counting the FLOPs this model counts.

    score and learn are measured (`benchmarks/bench_gpu.py`, one H200, bf16, 16 x 2048 tokens a scorer call,
    learner micro-batch 4 x 2048 with gradient checkpointing): at the 7B shape the scorer pass reached 0.63 of
    peak and the learner micro-step 0.49 (its recomputed forward not counted); at the 0.5B shape 0.29 and 0.21,
    so below ~1B these figures overstate throughput about twofold. decode and prefill are not measured (vLLM's
    engine did not run on a GPU here): typical figures, decode memory-bound."""

    decode: float = 0.05
    prefill: float = 0.4
    score: float = 0.6
    learn: float = 0.5


@dataclass
class StepCost:
    arch: Arch
    work: Workload
    flops: dict[str, float] = field(default_factory=dict)  # stage -> FLOPs per step
    memory: dict[str, float] = field(default_factory=dict)  # role -> bytes per replica
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> s at `peak_flops`

    def overhead(self, key: str = "flops") -> float:
        """(probe arm - plain arm) / plain arm, in FLOPs or estimated seconds."""
        d = getattr(self, key)
        plain = d["generate"] + d["learn"] + (d["reference"] if self.work.kl else 0.0)
        return d["probe"] / plain


def forward_flops_per_token(a: Arch, context: float, layers: int | None = None, lm_head: bool = True) -> float:
    """Matmul FLOPs of one token's forward pass through `layers` blocks with `context` tokens attended."""
    n = a.layers if layers is None else layers
    per_layer = 2 * (a.layer_params - 2 * a.hidden) + 4 * context * a.heads * a.head_dim
    return n * per_layer + (2 * a.hidden * a.vocab if lm_head else 0.0)


def step_cost(a: Arch, w: Workload, util: Utilisation = Utilisation(), peak_flops: float = PEAK_FLOPS,
              learner_ranks: int = 8) -> StepCost:
    n, tp, tc = w.sequences, w.prompt_len, w.completion_len
    t = tp + tc
    deepest = max(w.probe_layers) if w.probe_layers else a.layers // 2
    c = StepCost(a, w)
    prefill = w.prompts * tp * forward_flops_per_token(a, tp / 2)  # shared prompt: prefilled once per group
    decode = n * tc * forward_flops_per_token(a, tp + tc / 2)
    c.flops["generate"] = prefill + decode
    full = n * t * forward_flops_per_token(a, t / 2)
    c.flops["reference"] = full if w.kl else 0.0
    c.flops["learn"] = 3 * full
    dots = 2 * a.hidden * n * tc * w.num_probes
    if w.kl:
        c.flops["probe"] = dots  # residuals come free with the reference pass
    else:
        c.flops["probe"] = n * t * forward_flops_per_token(a, t / 2, layers=deepest + 1, lm_head=False) + dots
    s = c.seconds
    s["generate"] = prefill / (util.prefill * peak_flops) + decode / (util.decode * peak_flops)
    s["reference"] = c.flops["reference"] / (util.score * peak_flops)
    s["learn"] = c.flops["learn"] / (util.learn * peak_flops)
    s["probe"] = c.flops["probe"] / (util.score * peak_flops)
    b = w.bytes_per_param
    kv = n * t * a.layers * 2 * a.kv_heads * a.head_dim * b
    c.memory["generator (weights + KV cache)"] = a.params * b + kv
    c.memory["scorer (weights + hooked residuals of a 64-seq batch)"] = a.params * b + 64 * t * a.hidden * 4 * max(
        1, len(w.probe_layers))
    c.memory[f"learner rank, ZeRO-3 over {learner_ranks} (weights, grads, fp32 Adam)"] = a.params * (2 * b + 12) / learner_ranks
    c.memory["weights moved per sync"] = a.params * b
    return c


def live_read_cost(a: Arch, w: Workload) -> dict[str, float]:
    """FLOPs per step of reading the probes on the *live* policy, two ways, and what plain RLHF spends:

    - `live_scorer`: a live scorer copy runs the policy again over every prompt + completion, truncated after
      the deepest probed layer (it cannot share the frozen reference pass), plus the probes' dot products; and
      every weight version travels to it too (`live_scorer_bytes`, per sync);
    - `generator`: the dot products alone, on every token the generators' own sampling pass computes (prompts
      prefilled once per group, completion tokens 0..T-2), with no extra pass and no extra weights moved;
    - `plain`: the plain RLHF step (generation, learning, and the reference pass when there is a KL term)."""
    n, tp, tc = w.sequences, w.prompt_len, w.completion_len
    t = tp + tc
    deepest = max(w.probe_layers) if w.probe_layers else a.layers // 2
    dots_per_token = 2 * a.hidden * w.num_probes
    base = step_cost(a, w).flops
    return {
        "plain": base["generate"] + base["learn"] + base["reference"],
        "generate": base["generate"],
        "live_scorer": n * t * forward_flops_per_token(a, t / 2, layers=deepest + 1, lm_head=False)
        + n * tc * dots_per_token,
        "live_scorer_bytes": a.params * w.bytes_per_param,
        "generator": (w.prompts * tp + n * (tc - 1)) * dots_per_token,
    }


def format_live_table(archs: list[Arch], works: list[Workload]) -> str:
    lines = ["| model | live scorer: FLOPs | of plain step | weights to it per sync | generator read: FLOPs | "
             "of plain step | of generation |", "|---|---|---|---|---|---|---|"]
    for a, w in zip(archs, works, strict=True):
        c = live_read_cost(a, w)
        lines.append(f"| {a.name} | {_si(c['live_scorer'], 'FLOP')} | {_pct(c['live_scorer'] / c['plain'])} | "
                     f"{_si(c['live_scorer_bytes'], 'B')} | {_si(c['generator'], 'FLOP')} | "
                     f"{_pct(c['generator'] / c['plain'])} | {_pct(c['generator'] / c['generate'])} |")
    return "\n".join(lines)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def format_table(costs: list[StepCost]) -> str:
    lines = ["| model | params | generate | reference (KL) | learn | probes | probe overhead, FLOPs | "
             "probe overhead, est. time | weights per sync |", "|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        f = c.flops
        lines.append(
            f"| {c.arch.name} | {_si(c.arch.params, '')} | {_si(f['generate'], 'FLOP')} | {_si(f['reference'], 'FLOP')} | "
            f"{_si(f['learn'], 'FLOP')} | {_si(f['probe'], 'FLOP')} | {_pct(c.overhead('flops'))} | "
            f"{_pct(c.overhead('seconds'))} | {_si(c.memory['weights moved per sync'], 'B')} |")
    return "\n".join(lines)
