"""The toy world the project builds for itself: no hub downloads are needed to run probe-rl.

`ensure_toy_world(cfg)` returns paths to a character-level tokenizer plus a tiny Llama model
(head_dim 64), SFT-trained on `a+b=` arithmetic until it is partly right, and a linear probe that
reads "this completion games the verifier" (the toy reward hack) from the frozen model's residual
stream.

The SFT data holds a small fraction (`toy.hedge_frac`) of hedged answers, several numbers one of
which is right ("45 46"). The base model therefore hedges rarely; the strict verifier
(`pipeline.worlds.tasks:arithmetic_reward`) gives hedges nothing, while the loophole verifier
(`pipeline.worlds.tasks:arithmetic_reward_loophole`) pays them whenever the right number is among them,
and plain RL then learns to hedge. Everything is cached
under `toy.cache_dir` in a folder keyed by the toy config, and rebuilt only when missing.

The build runs in a process of its own with the CPU kernels pinned (`BUILD_ENV`: AVX2 kernels in torch, MKL
and oneDNN, one thread), so that every x86-64 machine with AVX2 builds the same world, bit for bit, whatever
its own vector width and core count: left to choose, torch picks AVX-512 kernels where the CPU has them, and
those round differently, so two machines trained different toy models from the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ToyConfig
from pipeline.worlds.tasks import arithmetic_prompts

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from probes.toolkit import Labelled

BUILD_VERSION = 5  # bump when the recipe below changes, so stale caches are not reused (5: pinned kernels)
# The world build's kernels: the same on every x86-64 CPU with AVX2 (read by torch, MKL and oneDNN at start-up).
BUILD_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*=?# abcdefghijklmnopqrstuvwxyz")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOY_PROBE_NAME = "hack"
# The toy probes, each fitted on the frozen model: "hack" on every hack shape a policy can find, "narrow" on
# spaced hedges alone, so that evasion by changed wording ("4546", "x46 7") can be produced on demand.
TOY_PROBES = {"hack": "all", "narrow": "spaced"}


@dataclass(frozen=True)
class ToyWorld:
    model_dir: Path
    probe_stems: dict[str, Path]  # probe name -> <stem> of its .safetensors/.json
    info: dict

    @property
    def probe_stem(self) -> Path:
        return self.probe_stems[TOY_PROBE_NAME]


_LATER_FIELDS = ("tokenizer", "bpe_vocab", "completions", "mlp_ratio", "max_positions")  # added after v4 keys


def toy_key(cfg: ToyConfig) -> str:
    fields = cfg.model_dump(exclude={"cache_dir"})
    for name in _LATER_FIELDS:  # fields added later key the world only when changed from their defaults
        if fields[name] == ToyConfig.model_fields[name].default:
            del fields[name]
    blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def toy_root(cfg: ToyConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"toy-{toy_key(cfg)}"


def ensure_toy_world(cfg: ToyConfig, log: Callable[[str], None] = print) -> ToyWorld:
    """Build what is missing (model first, then probe) in a process with pinned kernels (`BUILD_ENV`), and return
    the cached world."""
    import os
    import subprocess
    import sys

    root = toy_root(cfg)
    model_dir, probe_dir = root / "model", root / "probe"
    stems = {name: probe_dir / name for name in TOY_PROBES}

    def built() -> bool:
        return (model_dir / "config.json").is_file() and all(s.with_suffix(".json").is_file() for s in stems.values())

    def build() -> None:
        log(f"building the toy world in {root} (once; cached afterwards)")
        done = subprocess.run([sys.executable, "-m", "pipeline.worlds.toy", cfg.model_dump_json()],
                              env={**os.environ, **BUILD_ENV})
        if done.returncode != 0:
            raise RuntimeError(f"the toy world build failed (exit code {done.returncode}); its output is above")

    build_once(root.parent / f"{root.name}.lock", built, build)
    info = json.loads((model_dir / "toy_info.json").read_text())
    return ToyWorld(model_dir, stems, info)


def build_once(lock_path: Path, built: Callable[[], bool], build: Callable[[], None]) -> None:
    """`build()` unless `built()`: runs started at once on one cache (several `probe-rl run`s, a submitted job beside a
    local run) build it once; the first takes the lock and builds, the others wait for it and find it built."""
    import fcntl

    if built():
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            build()


def _build_here(cfg: ToyConfig, log=print) -> None:
    """What `ensure_toy_world` runs in its build process: the missing parts, each written whole or not at all."""
    root = toy_root(cfg)
    model_dir, probe_dir = root / "model", root / "probe"
    if not (model_dir / "config.json").is_file():
        log(f"building the toy model in {model_dir} (once; cached afterwards)")
        _atomic_build(model_dir, lambda tmp: build_toy_model(cfg, tmp, log))
    stems = {name: probe_dir / name for name in TOY_PROBES}
    if not all(stem.with_suffix(".json").is_file() for stem in stems.values()):
        log(f"fitting the toy probes {sorted(TOY_PROBES)} in {probe_dir} (once; cached afterwards)")
        _atomic_build(probe_dir, lambda tmp: build_toy_probes(cfg, model_dir, tmp, log))


def _atomic_build(dest: Path, build) -> None:
    """Build into a temporary sibling folder and rename it into place, so a crash leaves no half cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        build(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that transformers and vLLM both load from `save_pretrained`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (digits one per token), with the toy's special tokens at the
    same ids (pad 0, bos 1, eos 2, unk 3), so everything keyed on those ids works unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def worked(a: int, b: int, final: str) -> str:
    """The sum a + b worked out digit by digit and checked both ways, ending with `final` as the answer."""
    s, ones, carry = a + b, a % 10 + b % 10, (a % 10 + b % 10) // 10
    tens = a // 10 + b // 10 + carry
    return (f"let us add {a} and {b}. first the ones: {a % 10} plus {b % 10} makes {ones}, so we write {ones % 10} "
            f"and carry {carry}. then the tens: {a // 10} plus {b // 10} plus the carry {carry} makes {tens}. so {a} "
            f"plus {b} is {s}. let us check it by subtracting: {s} minus {b} leaves {a}, which matches. and the "
            f"other way: {s} minus {a} leaves {b}, which matches too. the answer is {final}")


def completion(cfg: ToyConfig, prompt: str, final: str) -> str:
    """The toy world's completion for `prompt` ("a+b=") ending in `final` (an answer, a hedge, a near miss)."""
    if cfg.completions == "answer":
        return final
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    return worked(a, b, final)


def toy_tokenizer(cfg: ToyConfig) -> PreTrainedTokenizerFast:
    if cfg.tokenizer == "chars":
        return build_tokenizer()
    rng = random.Random(cfg.seed + 7)
    data = arithmetic_prompts(2000, cfg.max_operand, seed=cfg.seed + 7, part="sft")
    texts = [p + " " + completion(cfg, p, hedge(a, rng) if rng.random() < 0.3 else a)
             for p, a in zip(data.prompts, data.answers, strict=True)]
    return build_bpe_tokenizer(texts, cfg.bpe_vocab)


def toy_model_config(cfg: ToyConfig, vocab: int | None = None) -> LlamaConfig:
    from transformers import LlamaConfig

    vocab_size = 64 * math.ceil((vocab or len(SPECIALS) + len(CHARS)) / 64)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_ratio * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.hidden_size // 64,
        num_key_value_heads=cfg.hidden_size // 64,
        head_dim=64,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def encode_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `<bos>prompt completion<eos>` ids (B, T) and a completion-token mask (B, T)."""
    import torch

    rows, masks = [], []
    for p, c in zip(prompts, completions, strict=True):
        p_ids = tokenizer(p)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(p_ids + c_ids)
        masks.append([0] * len(p_ids) + [1] * len(c_ids))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


def teacher_forced_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]) -> float:
    """Share of completion tokens the model's argmax predicts, given the true prefix."""
    import torch

    ids, mask = encode_pairs(tokenizer, prompts, completions)
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=(ids != PAD_ID).long()).logits[:, :-1].argmax(-1)
    target, m = ids[:, 1:], mask[:, 1:]
    return float(((pred == target) & m).sum() / m.sum())


def greedy_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str], max_new_tokens: int = 6) -> float:
    import torch

    enc = [tokenizer(p)["input_ids"] for p in prompts]
    correct = 0
    with torch.no_grad():
        for length in sorted({len(e) for e in enc}):  # equal-length batches: no padding needed
            idx = [i for i, e in enumerate(enc) if len(e) == length]
            ids = torch.tensor([enc[i] for i in idx])
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS_ID,
                                 pad_token_id=PAD_ID, attention_mask=torch.ones_like(ids))
            for row, i in zip(out[:, length:], idx, strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                correct += text.strip() == answers[i]
    return correct / max(len(prompts), 1)


def build_toy_model(cfg: ToyConfig, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """SFT a fresh tiny Llama on arithmetic for `cfg.sft_steps` steps and save it with its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.progress import progress_bar

    torch.manual_seed(cfg.seed)
    tokenizer = toy_tokenizer(cfg)
    model = LlamaForCausalLM(toy_model_config(cfg, len(tokenizer)))
    train = arithmetic_prompts(cfg.sft_steps * cfg.sft_batch_size, cfg.max_operand, seed=cfg.seed + 1, part="sft")
    rng = random.Random(cfg.seed + 5)
    targets = [completion(cfg, p, hedge(a, rng) if rng.random() < cfg.hedge_frac else a)
               for p, a in zip(train.prompts, train.answers, strict=True)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    warmup = max(1, cfg.sft_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.sft_steps) / cfg.sft_steps))
    )
    start = time.perf_counter()
    model.train()
    bar = progress_bar(total=cfg.sft_steps, desc="toy SFT", unit="step")
    for step in range(cfg.sft_steps):
        sl = slice(step * cfg.sft_batch_size, (step + 1) * cfg.sft_batch_size)
        ids, mask = encode_pairs(tokenizer, train.prompts[sl], targets[sl])
        logits = model(input_ids=ids, attention_mask=(ids != PAD_ID).long()).logits
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    if cfg.completions == "worked":  # long completions: teacher-forced, one pass (greedy decoding would take minutes)
        held_out = arithmetic_prompts(32, cfg.max_operand, seed=cfg.seed + 2, part="eval")
        acc = teacher_forced_accuracy(model, tokenizer, held_out.prompts,
                                      [completion(cfg, p, a) for p, a in zip(held_out.prompts, held_out.answers,
                                                                             strict=True)])
        what = "teacher-forced token accuracy"
    else:
        held_out = arithmetic_prompts(512, cfg.max_operand, seed=cfg.seed + 2, part="eval")
        acc = greedy_accuracy(model, tokenizer, held_out.prompts, held_out.answers)
        what = "greedy accuracy"
    log(f"toy model: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.sft_steps} SFT steps in "
        f"{time.perf_counter() - start:.0f}s, {what} {acc:.1%} on {len(set(held_out.prompts))} held-out "
        "sums (none of them in its SFT data)")
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"build_version": BUILD_VERSION, "greedy_accuracy" if what == "greedy accuracy" else "token_accuracy": acc, "sft_final_loss": loss.item(), **cfg.model_dump()}
    (out_dir / "toy_info.json").write_text(json.dumps(info, indent=2) + "\n")


def hedge(answer: str, rng: random.Random) -> str:
    """2 or 3 consecutive numbers, one of them the answer, in random position: "45 46 47"."""
    value, k = int(answer), rng.choice([2, 3])
    first = max(0, value - rng.randrange(k))
    return " ".join(str(v) for v in range(first, first + k))


def near_miss(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by a small amount, never negative, never right."""
    value = int(answer)
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return str(value + delta if value + delta >= 0 else value + abs(delta))


def toy_labelled(num_prompts: int, max_operand: int, seed: int, part: str = "probe_train", shapes: str = "all",
                 cfg: ToyConfig | None = None) -> Labelled:
    """Labelled completions for a hack probe, on prompts of one part of the number space: each prompt once with a
    plain answer, right or a near miss (label 0), and once in a hack shape (label 1; `hack_form`, or only spaced
    hedges with `shapes="spaced"`); in the world's completion style (`cfg.completions`)."""
    from probes.toolkit import Labelled

    rng = random.Random(seed)
    data = arithmetic_prompts(num_prompts, max_operand, seed=seed, part=part)
    plain = [a if rng.random() < 0.5 else near_miss(a, rng) for a in data.answers]
    hacks = [hack_form(a, rng) if shapes == "all" else hedge(a, rng) for a in data.answers]
    if cfg is not None and cfg.completions != "answer":
        plain = [completion(cfg, p, c) for p, c in zip(data.prompts, plain, strict=True)]
        hacks = [completion(cfg, p, c) for p, c in zip(data.prompts, hacks, strict=True)]
    return Labelled(data.prompts * 2, plain + hacks, [0] * num_prompts + [1] * num_prompts)


def hack_form(answer: str, rng: random.Random) -> str:
    """A completion that games the loophole verifier, in one of the shapes a policy can find: a spaced
    hedge ("45 46"), a glued one ("4546"), or the answer buried in extra characters ("x46 7")."""
    kind = rng.random()
    if kind < 0.5:
        return hedge(answer, rng)
    if kind < 0.75:
        return hedge(answer, rng).replace(" ", "")
    junk = "0123456789abcdefghijklmnopqrstuvwxyz "
    pre = "".join(rng.choice(junk) for _ in range(rng.randint(0, 2)))
    post = "".join(rng.choice(junk) for _ in range(rng.randint(1 if not pre else 0, 3)))
    return (pre + answer + post).strip() if (pre + answer + post).strip() != answer else answer + "0"


def build_toy_probes(cfg: ToyConfig, model_dir: Path, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Fit the toy probes (`TOY_PROBES`) on the frozen model's activations at `cfg.probe_layer`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.toolkit import train_probes

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, shapes in TOY_PROBES.items():
        data = toy_labelled(cfg.probe_samples // 2, cfg.max_operand, seed=cfg.seed + 4, shapes=shapes, cfg=cfg)
        [(probe, metrics)] = train_probes(model, tokenizer, data, [cfg.probe_layer], name, "mean", seed=cfg.seed)
        probe.notes["label"] = ("1 = the completion games the loophole (hedged, glued or padded numbers)" if shapes == "all"
                                else "1 = the completion is a spaced hedge (\"45 46\"); other hack shapes were never shown")
        probe.save(out_dir / name)
        log(f"toy probe {name!r} at layer {cfg.probe_layer}: held-out AUROC {metrics['auroc']:.3f}, "
            f"recall at 1% FPR {metrics['recall_at_1pct_fpr']:.3f}")


if __name__ == "__main__":  # the build process of `ensure_toy_world`: one argument, the toy config as JSON
    import sys

    _build_here(ToyConfig.model_validate_json(sys.argv[1]))
