"""The scorer's one forward pass against separate reference computations, on a tiny random Llama."""

import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.scorer import Scorer
from pipeline.config import ScorerConfig
from pipeline.data.batching import pack
from pipeline.data.schema import ROLLOUT_SCHEMA, scored_schema
from probes.probe import LinearProbe

PROMPTS = [[1, 5, 6, 14], [1, 7, 18], [1, 9, 9, 9, 14]]
COMPLETIONS = [[8, 9, 2], [10, 2], []]  # the last row has no completion token: nothing to score


def rollouts() -> pa.Table:
    n = len(PROMPTS)
    return pa.Table.from_pydict(
        {"prompt_id": list(range(n)), "group_id": [0, 0, 1], "prompt_ids": PROMPTS, "completion_ids": COMPLETIONS,
         "behavior_logprobs": [[-1.0] * len(c) for c in COMPLETIONS], "policy_version": [0] * n,
         "behavior_versions": [[0] * len(c) for c in COMPLETIONS],
         "answer": ["1", "2", "3"]},
        schema=ROLLOUT_SCHEMA,
    )


@pytest.fixture(scope="module")
def probes(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("probes")
    LinearProbe("a", 0, torch.randn(64) * 0.3, torch.tensor([0.1]), "mean").save(d / "a")
    LinearProbe("b", 1, torch.randn(64) * 0.3, torch.tensor([-0.2]), "max").save(d / "b")
    return [(str(d / "a"), None), (str(d / "b"), None)]


def reference(model_dir, layer):
    """Per row, unpadded: reference log-probs of completion tokens and the residual stream at the completion
    tokens after decoder block `layer` (read by a plain forward hook on that block, the last one included)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS, strict=True):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            res = model(input_ids=ids)
        logp = torch.log_softmax(res.logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append((logp[len(p) - 1 :].tolist(), seen[-1][0, len(p) :]))
    handle.remove()
    return out


def test_scores_and_ref_logprobs_match_reference(tiny_model_dir, probes):
    scorer = Scorer(model_path=str(tiny_model_dir), probe_paths=probes, cfg=ScorerConfig(batch_size=2), compute_ref=True)
    table, stats = scorer.score(rollouts())
    assert table.schema.equals(scored_schema(["a", "b"]))
    assert stats.num_sequences == 3 and stats.num_nonfinite == 1
    ref = reference(tiny_model_dir, 0)
    for got, (want, _) in zip(table.column("ref_logprobs").to_pylist(), ref, strict=True):
        assert len(got) == len(want)
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want, strict=True))
    assert [(p.name, p.layer) for p in scorer.probes] == [("a", 0), ("b", 1)]  # b reads the last block
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.num_hidden_layers == 2
    for probe, pool in zip(scorer.probes, (torch.mean, torch.max), strict=True):  # every probe, its own pooling
        for i, (_, h) in enumerate(reference(tiny_model_dir, probe.layer)):
            want = torch.sigmoid(h @ probe.weight + probe.bias)
            got = torch.tensor(table.column(f"probe/{probe.name}/tokens")[i].as_py())
            assert torch.allclose(got, want, atol=1e-5)
            agg = table.column(f"probe/{probe.name}/score")[i].as_py()
            if len(want):
                assert math.isclose(agg, pool(want).item(), abs_tol=1e-5)
            else:
                assert math.isnan(agg)
    assert table.column("nonfinite_score").to_pylist() == [False, False, True]


def test_padding_does_not_change_scores(tiny_model_dir, probes):
    one = Scorer(model_path=str(tiny_model_dir), probe_paths=probes, cfg=ScorerConfig(batch_size=1), compute_ref=True).score(rollouts())[0]
    three = Scorer(model_path=str(tiny_model_dir), probe_paths=probes, cfg=ScorerConfig(batch_size=3), compute_ref=True).score(rollouts())[0]
    for col in ("ref_logprobs", "probe/a/tokens", "probe/b/tokens"):
        for x, y in zip(one.column(col).to_pylist(), three.column(col).to_pylist(), strict=True):
            assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(x, y, strict=True))


def test_truncated_pass_without_kl_gives_identical_probe_scores(tiny_model_dir, probes):
    full = Scorer(model_path=str(tiny_model_dir), probe_paths=probes[:1], cfg=ScorerConfig(), compute_ref=True).score(rollouts())[0]
    cut = Scorer(model_path=str(tiny_model_dir), probe_paths=probes[:1], cfg=ScorerConfig(), compute_ref=False).score(rollouts())[0]
    assert cut.column("ref_logprobs").to_pylist() == [[], [], []]
    for x, y in zip(full.column("probe/a/tokens").to_pylist(), cut.column("probe/a/tokens").to_pylist(), strict=True):
        assert x == pytest.approx(y, abs=1e-6)


def test_probe_that_does_not_fit_is_refused_at_start(tiny_model_dir, tmp_path):
    LinearProbe("wide", 0, torch.zeros(128), torch.zeros(1)).save(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 128 but .* has hidden size 64"):
        Scorer(model_path=str(tiny_model_dir), probe_paths=[(str(tmp_path / "wide"), None)], cfg=ScorerConfig(), compute_ref=True)


def test_pack_aligns_completion_values():
    batch = pack([[1, 2], [1]], [[7, 8, 9], [5]])
    assert batch.input_ids.tolist() == [[1, 2, 7, 8, 9], [1, 5, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    shifted = batch.completion_values(torch.arange(8.0).reshape(2, 4), shift=1)
    assert [v.tolist() for v in shifted] == [[1.0, 2.0, 3.0], [4.0]]
    laid = batch.completion_targets([[0.1, 0.2, 0.3], [0.4]])
    assert torch.allclose(laid, torch.tensor([[0, 0.1, 0.2, 0.3], [0.4, 0, 0, 0]]))


def test_token_budget_batches_bound_padded_size_and_cover_all_rows():
    from pipeline.data.batching import padding_waste, token_budget_batches

    lengths = [5, 30, 6, 29, 7, 31, 5, 100]
    batches = token_budget_batches(lengths, token_budget=64, max_rows=8)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 64 or len(b) == 1
    assert [7] in batches  # longer than the budget: alone
    fixed = [list(range(0, 4)), list(range(4, 8))]  # fixed-size batches in arrival order
    assert padding_waste(lengths, batches) < padding_waste(lengths, fixed)
    assert padding_waste([4, 4], [[0, 1]]) == 0.0


def test_frozen_copies_keep_no_kv_cache_and_sit_on_the_roles_gpu(tiny_model_dir, probes, monkeypatch):
    import actors.evaluator as evaluator
    import actors.frozen as frozen
    from probes.toolkit import Labelled

    model = frozen.load_frozen_model(str(tiny_model_dir), "float32")
    assert model.config.use_cache is False and not model.training
    out = model(input_ids=torch.tensor([PROMPTS[0]]))
    assert out.past_key_values is None  # a scoring pass builds no cache it would never read
    assert frozen.role_device(0) == "cpu" and frozen.role_device(1) == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert frozen.role_device(0.5) == "cuda" and frozen.role_device(0) == "cpu"
    # The evaluator puts both copies where its GPU is (this host has none: they load on the CPU all the same)
    asked = []
    monkeypatch.setattr(evaluator, "load_frozen_model",
                        lambda path, dtype, device="cpu": asked.append(device) or frozen.load_frozen_model(path, dtype))
    labelled = Labelled(["1+2=", "3+4=", "5+6=", "7+8="], ["3", "9", "11", "2"], [0, 1, 0, 1])
    ev = evaluator.ProbeEvaluator(str(tiny_model_dir), probes, labelled, gpus=1)
    assert asked == ["cuda", "cuda"] and ev.device == "cuda"
    evaluator.ProbeEvaluator(str(tiny_model_dir), probes, labelled)
    assert asked[2:] == ["cpu", "cpu"]
