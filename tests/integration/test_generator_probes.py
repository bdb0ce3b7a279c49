"""Probe scores read inside vLLM's sampling pass (pipeline/transport/vllm_probes.py) equal those of a hooked transformers
forward of the same weights over the same prompt + completion, at the positions the generator covers (completion
tokens 0..T-2): with several probes on two layers, mixed prompt lengths in one batch, GRPO siblings sharing their
prompt through the prefix cache, chunked prefill, both engine modes (the separate engine process compiled with
torch.compile), after a weight sync (the new version's scores) and after a probe refit (new weights in place)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data.schema import PROMPT_SCHEMA

TOL = 1e-4

pytestmark = pytest.mark.integration


def _probes(toy_world, tmp_path):
    """The toy's hack probe, its narrow probe (read with "last"), and a random probe on layer 0: three probes,
    two layers."""
    from pipeline.worlds.toy import toy_root
    from probes.probe import LinearProbe, load_probe

    cfg, _ = toy_world
    probe_dir = toy_root(cfg.toy) / "probe"
    hack = load_probe(probe_dir / "hack")
    g = torch.Generator().manual_seed(3)
    extra = LinearProbe("random0", 0, torch.randn(hack.hidden_size, generator=g) * 0.1, torch.tensor([0.2]),
                        aggregation="max")
    assert load_probe(probe_dir / "narrow").layer != 0 or hack.layer != 0
    return [("hack", str(probe_dir / "hack"), None), ("narrow", str(probe_dir / "narrow"), "last"),
            ("random0", str(extra.save(tmp_path / "random0")), None)]


def _prompts(world, lengths) -> pa.Table:
    """Prompts of these lengths: toy prompts run together (the toy's own are about 7 tokens)."""
    ids = [(world.prompt_ids[i] + world.prompt_ids[i + 1] + world.prompt_ids[i + 2])[:n] for i, n in enumerate(lengths)]
    assert [len(i) for i in ids] == lengths
    return pa.Table.from_pydict({"prompt_id": list(range(len(ids))), "group_id": list(range(len(ids))),
                                 "prompt_ids": ids, "answer": ["0"] * len(ids)}, schema=PROMPT_SCHEMA)


def reference_reads(model, table: pa.Table, probes) -> dict[str, list[list[float]]]:
    """Per probe, per row: the hooked transformers pass's scores of completion tokens 0..T-2."""
    from probes.hooks import capture_residuals
    from probes.probe import load_probe

    loaded = [(name, load_probe(stem)) for name, stem, _ in probes]
    out: dict[str, list[list[float]]] = {name: [] for name, _ in loaded}
    for row in table.to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad(), capture_residuals(model, sorted({p.layer for _, p in loaded})) as cap:
            model(input_ids=ids)
        p, t = len(row["prompt_ids"]), len(row["completion_ids"])
        for name, probe in loaded:
            out[name].append(probe.token_scores(cap.residuals[probe.layer])[0, p:p + t - 1].tolist())
    return out


def assert_reads_match(table: pa.Table, model, probes, overrides=None) -> int:
    """Every generator-read token score within TOL of the reference; returns how many were compared."""
    import numpy as np

    from probes.probe import aggregate, load_probe

    want = reference_reads(model, table, probes if overrides is None else overrides)
    compared = 0
    for name, stem, aggregation in probes:
        got = table.column(f"probe/{name}/tokens").to_pylist()
        lengths = [len(c) for c in table.column("completion_ids").to_pylist()]
        assert [len(g) for g in got] == [max(t - 1, 0) for t in lengths]
        for g, w in zip(got, want[name], strict=True):
            assert np.allclose(g, w, atol=TOL, rtol=0), (name, g, w)
            compared += len(g)
        # the aggregate is the probe's own aggregation over those tokens
        how = aggregation or load_probe(stem).aggregation
        for g, s in zip(got, table.column(f"probe/{name}/score").to_pylist(), strict=True):
            if g:
                ref = aggregate(torch.tensor([g]), torch.ones(1, len(g), dtype=torch.bool), how).item()
                assert abs(ref - s) < 1e-6
    return compared


def _perturbed(model_dir: str, seed: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def test_reads_in_process_prefix_cache_chunked_prefill_weight_sync_and_refit(toy_world, tmp_path):
    """In-process engine, prefix caching on, prefill chunked at 8 tokens a step (unseeded: on CPU vLLM cannot chunk
    a seeded prefill), prompts of 3 to 12 tokens, 4 completions each; then a weight sync; then a probe refit."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    _, world = toy_world
    probes = _probes(toy_world, tmp_path)
    cfg = GeneratorConfig(max_new_tokens=10, engine_process="in_process", enforce_eager=True,
                          enable_prefix_caching=True, max_num_batched_tokens=8)
    gen = Generator(model_path=world.model_path, cfg=cfg, weight_backend="probe_rl_inline", probes=probes)
    assert gen.probe_names == ["hack", "narrow", "random0"]
    prompts = _prompts(world, [3, 12, 5, 9])
    assert max(len(p) for p in prompts.column("prompt_ids").to_pylist()) > 8  # some prefill is chunked
    table, _ = gen.generate(prompts, 4, None)
    base = AutoModelForCausalLM.from_pretrained(world.model_path, dtype=torch.float32)
    assert assert_reads_match(table, base, probes) > 50

    # a weight sync: the scores follow the version that sampled the tokens
    new = _perturbed(world.model_path, seed=1)
    assert gen.load_weights({k: v.clone() for k, v in new.state_dict().items()}, 1) == 1
    table, _ = gen.generate(prompts, 4, None)
    assert set(table.column("policy_version").to_pylist()) == {1}
    assert assert_reads_match(table, new, probes) > 50
    with pytest.raises(AssertionError):  # and differ from the old weights' reading
        assert_reads_match(table, base, probes)

    # a refit: new probe weights replace the old in place
    from probes.probe import load_probe

    hack = load_probe(probes[0][1])
    refit = hack.weight.flip(0) * 0.5
    gen.set_probe("hack", {"weight": refit, "bias": torch.tensor([0.1])})
    hack.weight, hack.bias = refit, torch.tensor([0.1])
    refit_stem = str(hack.save(tmp_path / "hack_refit"))
    table, _ = gen.generate(prompts, 2, None)
    assert assert_reads_match(table, new, probes,
                              overrides=[("hack", refit_stem, None), *probes[1:]]) > 20


def _leaf(kind: pa.DataType) -> pa.DataType:
    while pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return kind


def _flatten(values: list) -> list:
    return [x for v in values for x in (_flatten(v) if isinstance(v, list) else [v])]


def test_reads_separate_engine_compiled(toy_world, tmp_path):
    """vLLM's separate engine process with torch.compile on (the hooks are traced into the compiled graph),
    seeded sampling, prefix caching on, mixed prompt lengths; then a weight sync."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Generator
    from pipeline.config import GeneratorConfig

    _, world = toy_world
    probes = _probes(toy_world, tmp_path)[:2]
    cfg = GeneratorConfig(max_new_tokens=10, engine_process="separate", enforce_eager=False,
                          enable_prefix_caching=True)
    gen = Generator(model_path=world.model_path, cfg=cfg, weight_backend="probe_rl_inline", probes=probes)
    prompts = _prompts(world, [4, 11, 6])
    table, _ = gen.generate(prompts, 4, 7)
    again, _ = gen.generate(prompts, 4, 7)
    # seeded: the same completions and the same token scores (aggregates may be NaN: one-token completions).
    # Tokens and versions exactly; log-probs and scores to float32 rounding: the second call reads the prompts
    # from the prefix cache, and the separate engine process batches them as they arrive, so the same numbers
    # come from other kernels' summation orders.
    same = [c for c in table.column_names if not c.endswith("/score")]
    for name in same:
        a, b = table.column(name).to_pylist(), again.column(name).to_pylist()
        if pa.types.is_floating(_leaf(table.schema.field(name).type)):
            flat_a, flat_b = np.array(_flatten(a), dtype=float), np.array(_flatten(b), dtype=float)
            assert flat_a.shape == flat_b.shape and np.allclose(flat_a, flat_b, atol=1e-5, equal_nan=True), name
        else:
            assert a == b, name
    base = AutoModelForCausalLM.from_pretrained(world.model_path, dtype=torch.float32)
    assert assert_reads_match(table, base, probes) >= 10
    new = _perturbed(world.model_path, seed=2)
    gen.load_weights({k: v.clone() for k, v in new.state_dict().items()}, 1)
    table, _ = gen.generate(prompts, 4, 7)
    assert assert_reads_match(table, new, probes) >= 10
