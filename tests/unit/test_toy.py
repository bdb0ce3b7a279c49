"""The worlds the project builds itself: the mid world's BPE tokenizer and worked completions, and a world built
once into its cache and reused."""

from pathlib import Path

import pytest

from pipeline.config import ToyConfig, load_config
from pipeline.worlds.tasks import arithmetic_prompts
from pipeline.worlds.toy import BOS_ID, EOS_ID, PAD_ID, completion, ensure_toy_world, toy_root, toy_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mid():
    cfg = load_config(ROOT / "configs/mid.toml")
    return cfg, toy_tokenizer(cfg.toy)


def test_bpe_tokenizer_keeps_the_special_ids_splits_digits_and_round_trips(mid):
    cfg, tok = mid
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert 256 + 4 < len(tok) <= cfg.toy.bpe_vocab  # bytes, specials, merges (the text allows ~350)
    text = completion(cfg.toy, "17+25=", "42")
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and tok.decode(ids[1:]) == text
    pieces = tok.convert_ids_to_tokens(ids[1:])
    digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digit_pieces and all(len(p) == 1 for p in digit_pieces)  # one token per digit, as Llama's
    assert "".join(digit_pieces) == "".join(ch for ch in text if ch.isdigit())
    assert len(ids) < len(text) / 2  # merges: the words of the template are a few tokens each


def test_mid_world_completions_are_long_and_fit_the_generator(mid):
    """The mid world's SFT targets are 100+ tokens and fit both `generator.max_new_tokens` and the model."""
    cfg, tok = mid
    data = arithmetic_prompts(200, cfg.toy.max_operand, seed=3, part="sft")
    lengths = [len(tok(completion(cfg.toy, p, a), add_special_tokens=False)["input_ids"]) + 1  # + <eos>
               for p, a in zip(data.prompts, data.answers, strict=True)]
    prompt_len = max(len(tok(p)["input_ids"]) for p in data.prompts)
    assert 100 <= min(lengths) and max(lengths) <= cfg.generator.max_new_tokens
    assert prompt_len + max(lengths) <= min(cfg.toy.max_positions, cfg.generator.max_model_len)


def test_a_worked_bpe_world_is_built_once_into_its_cache_and_reused(tmp_path):
    """A scaled-down mid world (2 layers x 64, a few SFT steps): model, tokenizer and both probes land in the
    folder its config keys; a second call rebuilds nothing; a different recipe gets a different folder."""
    from transformers import AutoConfig, AutoTokenizer

    from probes.probe import load_probe

    cfg = ToyConfig(cache_dir=str(tmp_path), hidden_size=64, num_layers=2, tokenizer="bpe", bpe_vocab=300,
                    completions="worked", max_positions=192, sft_steps=2, sft_batch_size=2, probe_layer=1,
                    probe_samples=24)
    logs = []
    world = ensure_toy_world(cfg, log=logs.append)
    assert world.model_dir == toy_root(cfg) / "model"
    model_cfg = AutoConfig.from_pretrained(world.model_dir)
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    assert model_cfg.vocab_size >= len(tok) == 300 and model_cfg.vocab_size % 64 == 0
    assert (model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.max_position_embeddings) == (64, 2, 192)
    assert 0.0 <= world.info["token_accuracy"] <= 1.0 and world.info["completions"] == "worked"
    for stem in world.probe_stems.values():
        probe = load_probe(stem)
        assert probe.layer == 1 and probe.hidden_size == 64
    stamps = {p: p.stat().st_mtime_ns for p in toy_root(cfg).rglob("*") if p.is_file()}
    logs.clear()
    again = ensure_toy_world(cfg, log=logs.append)
    assert again == world and logs == []
    assert {p: p.stat().st_mtime_ns for p in toy_root(cfg).rglob("*") if p.is_file()} == stamps
    assert toy_root(cfg.model_copy(update={"sft_steps": 3})) != toy_root(cfg)


def test_the_world_build_gives_the_same_model_whatever_the_machines_kernels_and_threads(tmp_path):
    """The build runs with pinned kernels (`BUILD_ENV`), so a machine whose torch would choose other vector kernels
    or thread counts builds the same world, bit for bit. Shown here by building a small world twice, under an
    environment that asks for AVX-512 kernels (unvectorised ones on a CPU without AVX-512) and 2 threads and under
    one that asks for AVX2 and 1 thread: the same files. Without the pin those two builds differ where the CPU has
    AVX-512 (checked too, when it has)."""
    import hashlib
    import os
    import subprocess
    import sys

    cfg = dict(hidden_size=64, num_layers=2, sft_steps=40, sft_batch_size=16, probe_layer=1, probe_samples=32)

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
                if p.suffix == ".safetensors"}

    def build(entry: str, isa: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        """A build in a process of its own, started now (the two of a pair run side by side), on environment `env`
        (what the machine would choose)."""
        c = ToyConfig(cache_dir=str(tmp_path / isa), **cfg)
        code = (f"import sys; from pipeline.config import ToyConfig; from pipeline.worlds.toy import {entry}; "
                f"{entry}(ToyConfig.model_validate_json(sys.argv[1]), log=lambda *_: None)")
        return subprocess.Popen([sys.executable, "-c", code, c.model_dump_json()], cwd=ROOT,
                                env={**os.environ, **env, "PYTHONPATH": str(ROOT)}), toy_root(c)

    def digests(builds) -> list[dict[str, str]]:
        assert [proc.wait(timeout=600) for proc, _ in builds] == [0] * len(builds)
        return [digest(root) for _, root in builds]

    # ensure_toy_world, the way every run builds the world: it pins the build's kernels and threads. The calling
    # process runs under the other environment, so it may only ask for kernels this CPU has: AVX-512 where it has
    # them, else torch's unvectorised "default" kernels (asked for AVX-512 on a CPU without it, torch runs them
    # anyway and dies of SIGILL)
    import torch

    wide = "avx512" if torch.cpu._is_avx512_supported() else "default"
    built = digests([build("ensure_toy_world", isa, {"ATEN_CPU_CAPABILITY": isa, "OMP_NUM_THREADS": threads})
                     for isa, threads in ((wide, "2"), ("avx2", "1"))])
    assert len(built[0]) == 3 and built[0] == built[1]  # model and both probes, equal

    # the same two environments without the pin: the model differs when the CPU runs AVX-512 kernels
    if wide != "avx512":
        pytest.skip(f"this CPU has no AVX-512 (torch runs {torch.backends.cpu.get_cpu_capability()} kernels): the "
                    "pinned builds agreed; the unpinned comparison needs AVX-512")
    unpinned = digests([build("_build_here", f"unpinned-{isa}", {"ATEN_CPU_CAPABILITY": isa})
                        for isa in ("avx512", "avx2")])
    assert unpinned[0]["model/model.safetensors"] != unpinned[1]["model/model.safetensors"]


def test_runs_started_at_once_on_one_cache_build_the_world_once(tmp_path, monkeypatch):
    """Two `ensure_toy_world` calls at once on an empty cache: the build (its process stood in for by one that
    writes the files a build leaves, after a pause) runs once, under the lock; the other call waits for it and
    reads the finished world. A call that finds the world built takes no lock."""
    import json
    import subprocess
    import threading
    import time

    import pipeline.worlds.toy as toy

    cfg = ToyConfig(cache_dir=str(tmp_path))
    root = toy_root(cfg)
    builds = []

    def fake_build(cmd, env=None):
        builds.append(time.monotonic())
        time.sleep(0.5)  # long enough for the other call to arrive while this one builds
        (root / "model").mkdir(parents=True)
        (root / "model" / "config.json").write_text("{}")
        (root / "model" / "toy_info.json").write_text(json.dumps({"built": len(builds)}))
        (root / "probe").mkdir()
        for name in toy.TOY_PROBES:
            (root / "probe" / f"{name}.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_build)
    worlds, logs = [], []
    calls = [threading.Thread(target=lambda: worlds.append(ensure_toy_world(cfg, logs.append))) for _ in range(2)]
    for c in calls:
        c.start()
    for c in calls:
        c.join(timeout=30)
    assert len(builds) == 1 and len(worlds) == 2
    assert [w.info for w in worlds] == [{"built": 1}, {"built": 1}]
    assert sum("building the toy world" in m for m in logs) == 1
    (root.parent / f"{root.name}.lock").unlink()  # a built world is read without the lock
    assert ensure_toy_world(cfg).info == {"built": 1} and not (root.parent / f"{root.name}.lock").exists()
