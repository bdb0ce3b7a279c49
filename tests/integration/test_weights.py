"""The weight path on real Ray, vLLM (CPU) and DeepSpeed: vLLM's weight-transfer protocol over both
transports and both vLLM engine modes, bucketed sends that never copy the whole model, no hangs, and
checkpoints that load in transformers and vLLM."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import pytest
import torch

from pipeline.config import GeneratorConfig, LearnerConfig, ScorerConfig
from pipeline.transport.weights import BACKEND_GLOO, BACKEND_INLINE

from ._helpers import TIMEOUT, collective_sync, hf_greedy, runs_as, start_learners, train_batch

pytestmark = pytest.mark.integration
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Trained:
    learner: object  # the rank's actor
    checkpoint: str
    stats: list  # its TrainStats, step by step


def _train(world, cfg: LearnerConfig, seeds, folder) -> Trained:
    from pipeline.loop.remote import wait

    [learner] = start_learners(world.model_path, cfg, 16)
    stats = [wait(learner.train_step.remote(train_batch(world.model_path, 16, seed)), "learner", TIMEOUT)
             for seed in seeds]
    return Trained(learner, wait(learner.save_checkpoint.remote(str(folder)), "learner", TIMEOUT), stats)


@pytest.fixture(scope="module")
def trained(toy_world, ray_local, tmp_path_factory):
    """One learner rank trained 3 steps with a large learning rate (greedy completions change), and its
    checkpoint."""
    _, world = toy_world
    cfg = LearnerConfig(lr=3e-2, kl_coef=0.0, micro_batch_size=16, warmup_steps=0)
    done = _train(world, cfg, (0, 1, 2), tmp_path_factory.mktemp("ckpt"))
    yield done
    ray_local.kill(done.learner)


ONE_RANK = LearnerConfig(zero_stage=0, num_ranks=1, lr=1e-3, kl_coef=0.05, micro_batch_size=8, warmup_steps=0)
ONE_RANK_SEEDS = (0, 1)  # a train batch of 16 rows a step


@pytest.fixture(scope="module")
def one_rank(toy_world, ray_local, tmp_path_factory) -> Trained:
    """One rank at ZeRO-0 trained 2 steps at a small learning rate: what more ranks must reach (its actor is gone)."""
    _, world = toy_world
    done = _train(world, ONE_RANK, ONE_RANK_SEEDS, tmp_path_factory.mktemp("one_rank"))
    ray_local.kill(done.learner)
    return done


@pytest.mark.parametrize("engine_process", ["in_process", "separate"])
def test_generator_greedy_equals_transformers_after_an_object_store_sync(trained, toy_world, ray_local, engine_process):
    """After one sync through the object store, vLLM's greedy completions equal transformers `generate` on the
    learner's weights, with vLLM's engine in the actor's process and in its own process. The collective transport
    is checked the same way into an in-process engine by the cut-short test below (after its resend), and into a
    separate engine process by the tensor-parallel test (whose two workers sit under it)."""
    from actors.generator import Generator
    from pipeline.loop.remote import make_actor, wait

    learner, checkpoint = trained.learner, trained.checkpoint
    _, world = toy_world
    prompts = world.eval_prompt_ids[:6]
    gen = make_actor(Generator, "generator", 1, 0, model_path=world.model_path,
                     cfg=GeneratorConfig(max_new_tokens=8, engine_process=engine_process), weight_backend=BACKEND_INLINE)
    before = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    wire = wait(learner.get_weights.remote(), "learner", TIMEOUT)
    assert wait(gen.load_weights.remote(ray_local.put(wire), wire.version), "generator", TIMEOUT) == 3
    assert wait(gen.ready.remote(), "generator", TIMEOUT) == 3  # the version rollouts will carry
    after = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    assert after == hf_greedy(checkpoint, prompts)
    assert after != before, "training changed nothing: the test would not notice a missed update"
    ray_local.kill(gen)


def test_a_tensor_parallel_generator_on_cpu_takes_every_version_on_both_ranks(trained, toy_world, ray_local):
    """generator.tensor_parallel_size = 2 on CPU, vLLM's engine core in a process of its own: the engine runs two
    worker processes (its multiprocess executor), each joins the weight-transfer group at a rank of its own and
    loads its shard of each tensor; greedy completions after the sync equal transformers' on the learner's weights
    (and differ from those before it). This is also the collective transport's greedy check into a separate
    engine process (the parametrized test above checks the object store into both engine modes). Then the
    generator is frozen (SIGSTOP) and stopped for good the way the fleet stops one it replaces (`Fleet.stop`):
    vLLM's engine process and its two workers, which outlive a frozen actor, are ended within
    pipeline.health_timeout_s and none is left running."""
    import re

    from actors.generator import Generator
    from pipeline.config import load_config
    from pipeline.loop.fleet import Fleet
    from pipeline.loop.remote import Receiver, make_actor, wait

    learner, checkpoint = trained.learner, trained.checkpoint
    _, world = toy_world
    prompts = world.eval_prompt_ids[:6]
    gen = make_actor(Generator, "generator", 1, 0, model_path=world.model_path,
                     cfg=GeneratorConfig(max_new_tokens=8, tensor_parallel_size=2, engine_process="separate"),
                     weight_backend=BACKEND_GLOO)
    before = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    [stats] = collective_sync([learner], [Receiver("generator 0", gen, 2)], name="tp")
    assert stats.version == 3 and stats.num_bytes == stats.model_bytes
    assert wait(gen.ready.remote(), "generator", TIMEOUT) == 3
    after = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    assert after == hf_greedy(checkpoint, prompts) and after != before
    logs: list[str] = []
    fleet = Fleet(load_config(overrides={"pipeline": {"health_timeout_s": 2.0}}), world, logs.append)
    fleet.remember_processes(gen)
    _, pids = fleet.processes[gen._actor_id.hex()]
    assert len(pids) >= 4  # the actor, vLLM's engine process and its two workers
    os.kill(pids[0], signal.SIGSTOP)
    fleet.stop(gen)
    assert all(re.fullmatch(r"killed \d+ process\(es\) of a stopped generator that outlived it by 2s", m)
               for m in logs), logs  # never "still running"
    assert [p for p in pids if runs_as(p, "")] == []


class _Holder:
    """A plain transformers model behind the receiver that live scorers use (pipeline.transport.weights.ModelReceiver),
    which can hand back what it received. Shipped to Ray workers by value (test modules are not importable
    there)."""

    def __init__(self, model_path: str) -> None:
        from actors.frozen import load_frozen_model
        from pipeline.transport.weights import ModelReceiver

        self.receiver = ModelReceiver(load_frozen_model(model_path, "float32"), "holder")

    def init_weight_transfer_engine(self, init_info):
        self.receiver.init_weight_transfer_engine(init_info)

    def start_weight_update(self):
        self.receiver.start_weight_update()

    def update_weights(self, update_info):
        self.receiver.update_weights(update_info)

    def finish_weight_update(self, weight_version):
        self.receiver.finish_weight_update(weight_version)

    def state(self) -> dict:
        return {k: v.clone() for k, v in self.receiver.model.named_parameters()}

    def ready(self) -> int:
        return self.receiver.version

    def pid(self) -> int:
        return os.getpid()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_train_as_one_and_only_rank_0_sends_what_both_hold(one_rank, toy_world, ray_local, tmp_path,
                                                                     zero_stage):
    """Two ranks at ZeRO-2 and at ZeRO-3 train on the batches one rank (ZeRO-0) trains on, and reach its weights:
    each valid token counted once across the ranks. Then they send to two receivers: both receive
    exactly the two ranks' weights (as their checkpoint has them); rank 1 sends nothing; each bucket stays below the
    bucket size, and under ZeRO-3 no rank ever gathers more than a layer group.

    Asserts what the multi-rank equivalence test and the received-weights test each asserted: training moved the
    weights, ZeRO-2 and ZeRO-3 on two ranks agree with one rank, each token seen once, the received weights equal
    the learner's bit for bit on both receivers at version 2 (ZeRO-3 gathering them a layer group at a time, ZeRO-2
    holding them whole), only rank 0 sends, in more than four buckets."""
    from transformers import AutoModelForCausalLM

    from pipeline.loop.remote import Receiver, make_actor, wait
    from pipeline.transport.weights import plan_buckets

    _, world = toy_world
    learners = start_learners(world.model_path, ONE_RANK.model_copy(update={"zero_stage": zero_stage, "num_ranks": 2}),
                              16)
    for seed, one_step in zip(ONE_RANK_SEEDS, one_rank.stats, strict=True):
        stats = wait([lr.train_step.remote(train_batch(world.model_path, 16, seed)) for lr in learners], "learner",
                     TIMEOUT)
        assert sum(s.num_tokens for s in stats) == one_step.num_tokens  # each valid token seen once
    holders = [make_actor(_Holder, "holder", 0.25, model_path=world.model_path) for _ in range(2)]
    bucket = 64 * 2**10
    stats = collective_sync(learners, [Receiver(f"holder {i}", h) for i, h in enumerate(holders)], bucket)
    checkpoint = wait([lr.save_checkpoint.remote(str(tmp_path)) for lr in learners], "learner", TIMEOUT)[0]
    expected = dict(AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(world.model_path).named_parameters())
    reached = dict(AutoModelForCausalLM.from_pretrained(one_rank.checkpoint).named_parameters())  # by one rank
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-4  # training moved them
    for k in expected:
        torch.testing.assert_close(expected[k], reached[k], rtol=1e-4, atol=1e-5, msg=f"ZeRO-{zero_stage}: {k}")
    for h in holders:
        got = wait(h.state.remote(), "holder", TIMEOUT)
        assert set(got) == set(expected)
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[name]), name
        assert wait(h.ready.remote(), "holder", TIMEOUT) == len(ONE_RANK_SEEDS)
    sizes = [p.numel() * p.element_size() for p in expected.values()]
    assert stats[0].num_bytes == stats[0].model_bytes == sum(sizes)
    assert stats[0].num_buckets == len(plan_buckets(sizes, bucket)) > 4  # whole-model copies never made
    assert stats[1].num_bytes == 0 and stats[1].num_buckets == 0
    for s in stats:
        if zero_stage == 3:  # one decoder layer group at a time, never the model
            assert 0 < s.max_gathered_bytes < s.model_bytes / 2
        else:  # every rank already holds whole parameters: nothing gathered
            assert s.max_gathered_bytes == 0
    for a in learners + holders:
        ray_local.kill(a)


def test_silent_or_dead_receiver_fails_the_sync_naming_it(toy_world, ray_local):
    """A receiver that never joins (its process stopped: it answers no health ping) and one that died both fail
    the sync within the health timeout, with an error that names the receiver and the weights version."""
    import time

    from actors.scorer import Scorer
    from pipeline.loop.remote import Receiver, ReceiverClient, make_actor, wait

    _, world = toy_world
    [learner] = start_learners(world.model_path, LearnerConfig(micro_batch_size=16), 16)
    scorers = [make_actor(Scorer, "scorer", 0.25, 0, model_path=world.model_path, probe_paths=[],
                          cfg=ScorerConfig(model="live"), compute_ref=False, weight_backend=BACKEND_GLOO)
               for _ in range(2)]
    pids = wait([s.pid.remote() for s in scorers], "scorer", TIMEOUT)
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent, as a frozen process or a hung host is
    try:
        client = ReceiverClient([Receiver("scorer 0", scorers[0]), Receiver("scorer 1", scorers[1])], TIMEOUT, 4)
        start = time.monotonic()
        with pytest.raises(Exception, match=r"scorer 1 did not answer a health ping before weights version 0 within "
                                            r"4s"):
            wait(learner.init_weight_transfer.remote(client, BACKEND_GLOO, 2**20, 10.0, "silent"), "learner", TIMEOUT)
        assert time.monotonic() - start < 30
    finally:
        os.kill(pids[1], signal.SIGCONT)
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(1)
    client = ReceiverClient([Receiver("scorer 0", scorers[0]), Receiver("scorer 1", scorers[1])], 8)
    with pytest.raises(Exception, match=r"scorer 1 died during a health ping before weights version 0"):
        wait(learner.init_weight_transfer.remote(client, BACKEND_GLOO, 2**20, 10.0, "dead"), "learner", TIMEOUT)
    for a in [learner, *scorers]:
        ray_local.kill(a)


def test_a_send_cut_short_by_a_dead_receiver_is_resent_whole_to_the_survivors(trained, toy_world, ray_local):
    """A receiver SIGKILLed after joining the transfer group fails the send that follows, after vLLM has opened
    its update session: the resend, to a group with a replacement, still reaches vLLM whole (the abandoned
    session is closed first: every byte of the model in more than one bucket) and its greedy completions, which
    training changed, are transformers' on the learner's weights. This is also the collective transport's
    greedy check into an in-process engine (into a separate engine process: the tensor-parallel test; the
    object store into both: the parametrized test above)."""
    from actors.generator import Generator
    from pipeline.loop.remote import Receiver, ReceiverClient, make_actor, wait

    learner, checkpoint = trained.learner, trained.checkpoint
    _, world = toy_world
    prompts = world.eval_prompt_ids[:6]
    gen = make_actor(Generator, "generator", 1, 0, model_path=world.model_path,
                     cfg=GeneratorConfig(max_new_tokens=8, engine_process="in_process"), weight_backend=BACKEND_GLOO)
    holder = make_actor(_Holder, "holder", 0.25, model_path=world.model_path)
    assert wait([gen.ready.remote(), holder.ready.remote()], "receivers (start-up)", TIMEOUT) == [0, 0]
    before = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    client = ReceiverClient([Receiver("generator 0", gen), Receiver("holder 0", holder)], TIMEOUT)
    wait(learner.init_weight_transfer.remote(client, BACKEND_GLOO, 2**20, 10.0, "cut-short"), "learner", TIMEOUT)
    os.kill(wait(holder.pid.remote(), "holder", TIMEOUT), signal.SIGKILL)
    with pytest.raises(Exception, match=r"holder 0 died during"):
        wait(learner.send_weights.remote(), "learner", TIMEOUT)
    assert wait(gen.ready.remote(), "generator", TIMEOUT) == 0  # nothing was committed
    replacement = make_actor(_Holder, "holder", 0.25, model_path=world.model_path)
    [stats] = collective_sync([learner], [Receiver("generator 0", gen), Receiver("holder 1", replacement)],
                              name="resend")
    assert stats.version == 3 and stats.num_bytes == stats.model_bytes and stats.num_buckets > 1
    assert wait(gen.ready.remote(), "generator", TIMEOUT) == 3  # the version rollouts will carry
    after = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    assert after == hf_greedy(checkpoint, prompts)
    assert after != before, "training changed nothing: the test would not notice a missed update"
    for a in (gen, replacement):
        ray_local.kill(a)


def test_a_checkpoint_loads_in_transformers_and_in_vllm_which_ablates_as_transformers_does(trained, toy_world,
                                                                                            ray_local):
    """A learner's checkpoint folder holds weights, config and tokenizer: transformers loads model and tokenizer
    from it, and a vLLM engine started on it answers exactly as transformers does (greedy evaluation of the
    policy itself: the ablation lifted). shaping.kind = "ablate" in generation, on that engine: its greedy
    completions with a direction projected out of its residual stream at the probe's layer equal transformers
    `generate` with the learner's hook doing the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import Generator
    from pipeline.loop.remote import make_actor, wait
    from probes.hooks import capture_residuals, edit_residual
    from probes.probe import load_probe, project_out, unit_direction

    checkpoint = trained.checkpoint
    _, world = toy_world
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "12+30="
    assert tokenizer(text)["input_ids"] == world.tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    probe = load_probe(world.probe_paths[0][0])
    prompts = world.eval_prompt_ids[:16]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # The model's greedy answers need not depend on the hack direction, so an edit that must show is used to
    # check the two implementations agree: the mean residual direction at the probe's layer.
    with torch.no_grad(), capture_residuals(model, [probe.layer]) as cap:
        model(input_ids=torch.tensor([prompts[0]]))
    u = unit_direction(cap.residuals[probe.layer][0].mean(0))
    gen = make_actor(Generator, "generator", 1, model_path=checkpoint, cfg=GeneratorConfig(max_new_tokens=8),
                     weight_backend=BACKEND_GLOO, ablation=(probe.layer, u.tolist()))
    ablated = wait(gen.greedy.remote(prompts, 8, True), "generator", TIMEOUT)
    lifted = wait(gen.greedy.remote(prompts, 8), "generator", TIMEOUT)
    with edit_residual(model, probe.layer, lambda h: project_out(h, u)):
        want = hf_greedy(checkpoint, prompts, model=model)
    assert ablated == want
    assert lifted == hf_greedy(checkpoint, prompts)
    assert ablated != lifted, "the ablation changed nothing: the test would not notice it missing"
    ray_local.kill(gen)


def test_a_nan_reference_logprob_costs_its_row_the_gradient_and_checkpointing_changes_no_update(toy_world, ray_local):
    """Two learners, one step each: one with learner.gradient_checkpointing on (activations recomputed in
    backward) on a batch with a NaN reference log-prob in one row, one without checkpointing on the same batch
    with that row masked out. Both give the same step and the same weights: the NaN costs its row the gradient,
    not the step, and checkpointing changes no update. (Either going wrong would part the two.)

    Asserts what the NaN test and the checkpointing test each asserted: the knob on and off as asked, the
    non-finite row counted, the loss finite and equal, the same rows counted, KL and gradient norm equal, every
    weight finite and equal, and the step did move them."""
    import numpy as np
    import pyarrow as pa

    from pipeline.loop.remote import wait
    from pipeline.transport.weights import from_wire

    _, world = toy_world
    clean = train_batch(world.model_path, 16, 11)
    ref = clean.column("ref_logprobs").to_pylist()
    ref[5] = [float("nan")] + ref[5][1:]
    poisoned = clean.set_column(clean.schema.get_field_index("ref_logprobs"), clean.schema.field("ref_logprobs"),
                                pa.array(ref, clean.schema.field("ref_logprobs").type))
    mask = clean.column("loss_mask").to_numpy(zero_copy_only=False).copy()
    mask[5] = False
    without = clean.set_column(clean.schema.get_field_index("loss_mask"), clean.schema.field("loss_mask"),
                               pa.array(mask, pa.bool_()))
    weights, stats = [], []
    for table, checkpointing in ((poisoned, True), (without, False)):
        cfg = LearnerConfig(lr=1e-2, kl_coef=0.1, micro_batch_size=8, warmup_steps=0,
                            gradient_checkpointing=checkpointing)
        [learner] = start_learners(world.model_path, cfg, 16)
        assert wait(learner.memory_knobs.remote(), "learner", TIMEOUT)["gradient_checkpointing"] is checkpointing
        stats.append(wait(learner.train_step.remote(table), "learner", TIMEOUT))
        weights.append(from_wire(wait(learner.get_weights.remote(), "learner", TIMEOUT)))
        ray_local.kill(learner)
    assert stats[0].nonfinite_rows == 1 and stats[1].nonfinite_rows == 0
    assert np.isfinite(stats[0].loss) and stats[0].num_rows == stats[1].num_rows == 14
    assert stats[0].loss == pytest.approx(stats[1].loss, rel=1e-5) and stats[0].kl == pytest.approx(stats[1].kl)
    assert stats[0].grad_norm == pytest.approx(stats[1].grad_norm, rel=1e-4)
    moved = 0
    for name, w in weights[0].items():
        assert torch.isfinite(w).all(), name
        torch.testing.assert_close(w, weights[1][name], rtol=0, atol=1e-6, msg=name)
        before = world_weight(world.model_path, name)
        moved += int(before is not None and not torch.equal(w, before))
    assert moved > 0  # the step did train


_WEIGHTS: dict[str, dict[str, torch.Tensor]] = {}


def world_weight(model_path: str, name: str) -> torch.Tensor | None:
    """A tensor of the saved model at `model_path` (None for one it does not store, e.g. a tied head)."""
    import glob

    from safetensors.torch import load_file

    if model_path not in _WEIGHTS:
        _WEIGHTS[model_path] = {k: v for f in glob.glob(f"{model_path}/*.safetensors") for k, v in load_file(f).items()}
    return _WEIGHTS[model_path].get(name)
