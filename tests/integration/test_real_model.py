"""SmolLM2-135M-Instruct, a real pretrained model with tied embeddings and a chat template, through the weight
path and the whole pipeline: after a learner step, vLLM's greedy completions equal transformers' on the learner's
weights through both transports (the object store into an in-process engine, the collective into an engine of
its own process) and from its checkpoint; and a short probe-rl run of configs/smollm2.toml end to end."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.config import GeneratorConfig, LearnerConfig
from pipeline.transport.weights import BACKEND_GLOO, BACKEND_INLINE

from ._helpers import ROOT, TIMEOUT, collective_sync, hf_greedy, start_learners, train_batch

pytestmark = pytest.mark.integration
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUESTIONS = ["What is 23 + 14? Answer with the number only.", "What is the capital of France? Answer in one word.",
             "What is 7 + 5?", "Name a colour."]
NEW = 12


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    from transformers import AutoTokenizer

    from pipeline.worlds.tasks import prompt_encoder

    return prompt_encoder(AutoTokenizer.from_pretrained(smollm2_dir), None, None, "smollm2")(QUESTIONS)


def _generator(model_path, backend, engine_process):
    from actors.generator import Generator
    from pipeline.loop.remote import make_actor

    return make_actor(Generator, "generator", 1, 0, model_path=model_path, weight_backend=backend,
                      cfg=GeneratorConfig(max_new_tokens=NEW, max_model_len=128, engine_process=engine_process))


def test_tied_embeddings_reach_vllm_through_both_transports_and_the_checkpoint(smollm2_dir, prompts, ray_local,
                                                                              tmp_path):
    from pipeline.loop.remote import Receiver, wait

    model_path = str(smollm2_dir)
    base = hf_greedy(model_path, prompts, NEW)
    assert base[0][-1] == 2  # the instruct model answers and stops at its EOS, <|im_end|>
    [learner] = start_learners(model_path, LearnerConfig(lr=1e-3, kl_coef=0.0, micro_batch_size=16, warmup_steps=0),
                               16)
    for seed in (0, 1):
        wait(learner.train_step.remote(train_batch(model_path, 16, seed)), "learner", TIMEOUT)
    checkpoint = wait(learner.save_checkpoint.remote(str(tmp_path / "ckpt")), "learner", TIMEOUT)
    trained = hf_greedy(checkpoint, prompts, NEW)
    assert trained != base, "two steps changed no greedy completion: the test would not notice a missed update"

    inline = _generator(model_path, BACKEND_INLINE, "in_process")
    assert wait(inline.greedy.remote(prompts, NEW), "generator", TIMEOUT) == base
    wire = wait(learner.get_weights.remote(), "learner", TIMEOUT)
    assert "model.embed_tokens.weight" in wire.arrays and "lm_head.weight" not in wire.arrays  # sent once
    wait(inline.load_weights.remote(ray_local.put(wire), wire.version), "generator", TIMEOUT)
    assert wait(inline.greedy.remote(prompts, NEW), "generator", TIMEOUT) == trained
    ray_local.kill(inline)

    gloo = _generator(model_path, BACKEND_GLOO, "separate")
    assert wait(gloo.greedy.remote(prompts, NEW), "generator", TIMEOUT) == base  # its engine is up
    [stats] = collective_sync([learner], [Receiver("generator 0", gloo, 1)], name="smollm2")
    assert stats.num_bytes == stats.model_bytes
    assert wait(gloo.greedy.remote(prompts, NEW), "generator", TIMEOUT) == trained
    ray_local.kill(gloo)
    ray_local.kill(learner)

    from_checkpoint = _generator(checkpoint, BACKEND_INLINE, "in_process")
    assert wait(from_checkpoint.greedy.remote(prompts, NEW), "generator", TIMEOUT) == trained
    ray_local.kill(from_checkpoint)


def test_a_short_run_of_the_smollm2_config(smollm2_dir, tmp_path):
    """`probe-rl run --config configs/smollm2.toml`, 2 steps of 4 prompts x 2: the prompts the generators got are
    the chat template's, completions end at the model's EOS or at max_new_tokens, and the rewards are the
    verifier's on the decoded text."""
    from transformers import AutoTokenizer

    from pipeline.worlds.tasks import final_number_reward

    cache = smollm2_dir.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "run", "--config", "configs/smollm2.toml",
         "--toy.cache_dir", str(cache), "--pipeline.num_steps", "2", "--pipeline.prompts_per_step", "4",
         "--pipeline.group_size", "2", "--generator.max_new_tokens", "16", "--task.eval_prompts", "4",
         "--run.output_dir", str(tmp_path), "--run.name", "smol", "--run.progress", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rollouts = pq.read_table(tmp_path / "smol" / "rollouts.parquet").to_pylist()
    metrics = pq.read_table(tmp_path / "smol" / "metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2] and {r["step"] for r in rollouts} == {1, 2}
    for r in rollouts:
        text = tok.decode(r["prompt_ids"])
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        ids = r["completion_ids"]
        assert 2 not in ids[:-1] and (ids[-1] == 2 or len(ids) == 16)  # stops at EOS, or at the length limit
        assert r["task_reward"] == final_number_reward([r["completion_text"]], [r["answer"]])[0]
    assert any(r["completion_ids"][-1] == 2 for r in rollouts)
