"""pipeline.colocate's hand-overs (pipeline/loop/turns.py): the order of one step's sleep, wake, offload and weight
push, on GPUs and on CPUs, how a run recovers from a hand-over left half-way, the GPU configuration it accepts
and refuses, and that what it calls is vLLM 0.32's API. The hand-overs on a real CPU engine (level 0), through
SIGKILLed roles, run in tests/integration/test_colocate.py; levels 1 and 2 and the CUDA IPC hand-off need a GPU."""

from __future__ import annotations

import inspect

import pytest

from pipeline.config import BACKEND_GLOO, BACKEND_IPC, ConfigError, load_config, weight_backend
from pipeline.loop.remote import Resources
from pipeline.loop.turns import Turns, plan

GPU = {"pipeline": {"colocate": True, "max_staleness": 0}, "generator": {"num_gpus": 0.5},
       "learner": {"num_gpus": 0.5}}


def _order(calls):
    return [f"{role}.{method}{list(args[0]) if args and args[0] else ''}" for role, method, args in calls]


@pytest.mark.parametrize("level", [1, 2])
def test_an_engine_that_frees_its_weights_wakes_them_before_the_update_and_its_cache_after(level):
    before, after = plan(level, offload=True)
    assert _order(before) == ["generators.sleep", "learners.reload_states"]
    # the optimizer state leaves before the engine's weights come back (the memory they need), the new version
    # is copied into woken weights, and the KV cache (scheduling resumes with it) only once they hold it
    assert _order(after) == ["learners.offload_states", "generators.wake_up['weights']", "weights.push",
                             "generators.wake_up['kv_cache']"]


def test_a_paused_engine_takes_the_update_and_then_resumes():
    before, after = plan(0, offload=False)
    assert _order(before) == ["generators.sleep"]
    assert _order(after) == ["weights.push", "generators.wake_up"]


class _Fleet:
    """The calls a fleet receives from Turns, in order (each answers in 0.5 s per actor)."""

    def __init__(self):
        self.calls = []

    def call_each(self, role, method, *args):
        self.calls.append(f"{role}.{method}")
        return [0.5, 0.25]


def test_turns_runs_the_plan_around_the_step_and_recovers_a_half_done_hand_over():
    fleet, pushed = _Fleet(), []
    turns = Turns(level=2, offload=True)
    turns.ready_to_generate(fleet)  # at start the optimizer state is on the GPU: it leaves before generation
    assert fleet.calls == ["learners.offload_states"] and not turns.learner_resident
    turns.before_learn(fleet)
    assert turns.asleep and turns.learner_resident
    turns.after_learn(fleet, lambda: pushed.append(list(fleet.calls)))
    assert pushed == [["learners.offload_states", "generators.sleep", "learners.reload_states",
                       "learners.offload_states", "generators.wake_up"]]  # pushed into woken weights
    assert not turns.asleep and turns.metrics() == {"colocate/sleep_s": 0.5, "colocate/reload_s": 0.5,
                                                    "colocate/offload_s": 0.5, "colocate/wake_s": 1.0}
    fleet.calls.clear()
    turns.ready_to_generate(fleet)
    assert fleet.calls == []  # nothing left to do
    # a learner lost mid-step: the engines still sleep; they wake before the restarted learner's checkpoint
    # weights reach them, and the new ranks' state (on the GPU) leaves before generation
    turns.before_learn(fleet)
    fleet.calls.clear()
    turns.around_restart(fleet, lambda: fleet.calls.append("weights.push"))
    assert fleet.calls == ["generators.wake_up", "weights.push"] and not turns.asleep and turns.learner_resident
    fleet.calls.clear()
    turns.ready_to_generate(fleet)
    assert fleet.calls == ["learners.offload_states"]


def test_a_run_that_does_not_colocate_only_pushes():
    fleet, pushed = _Fleet(), []
    turns = Turns.of(load_config())
    turns.ready_to_generate(fleet)
    turns.before_learn(fleet)
    turns.after_learn(fleet, lambda: pushed.append(1))
    assert fleet.calls == [] and pushed == [1] and turns.metrics() == {}


def test_gpu_colocation_shares_one_bundle_and_hands_weights_over_in_place():
    cfg = load_config(overrides=GPU)
    assert (cfg.sleep_level(), cfg.offloads_states(), weight_backend(cfg)) == (2, True, BACKEND_IPC)
    bundle = (Resources.of(cfg.generator) + Resources.of(cfg.learner)).bundle()
    assert bundle["GPU"] == 1.0 and bundle["CPU"] == cfg.generator.num_cpus + cfg.learner.num_cpus
    shipped = load_config("configs/gpu_colocated.toml")
    assert (shipped.sleep_level(), shipped.offloads_states(), weight_backend(shipped)) == (2, True, BACKEND_IPC)
    cpu = load_config(overrides={"pipeline": {"colocate": True, "max_staleness": 0}})
    assert (cpu.sleep_level(), cpu.offloads_states(), weight_backend(cpu)) == (0, False, BACKEND_GLOO)
    assert load_config().sleep_level() is None
    kept = load_config(overrides={**GPU, "generator": {"num_gpus": 0.5, "sleep_level": 1},
                                  "learner": {"num_gpus": 0.5, "offload_states": False}})
    assert (kept.sleep_level(), kept.offloads_states()) == (1, False)
    # a colocated run's saved config loads as a disaggregated one (profile arms switch colocate off)
    saved = cpu.model_dump()
    saved["pipeline"]["colocate"] = False
    assert load_config(overrides=saved).sleep_level() is None


@pytest.mark.parametrize(("change", "message"), [
    ({"generator": {"num_gpus": 0.75}}, "sum to at most 1"),
    ({"generator": {"num_gpus": 0.5, "num_workers": 2}, "pipeline": {"prompts_per_step": 4}},
     "must equal learner.num_ranks"),
    ({"generator": {"num_gpus": 0.5, "tensor_parallel_size": 2}}, "tensor_parallel_size=2"),
    ({"weights": {"transport": "object_store"}}, "CUDA IPC"),
    ({"scorer": {"model": "live"}}, "scorer.model"),
    ({"generator": {"num_gpus": 0}}, "both the generators and the learner need GPUs"),
])
def test_gpu_colocation_refuses_what_cannot_share_a_gpu(change, message):
    overrides = {k: {**GPU.get(k, {}), **change.get(k, {})} for k in {*GPU, *change}}
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pipeline": {"colocate": True, "max_staleness": 0}, "generator": {"sleep_level": 2}}, "no sleep mode on CPU"),
    ({"pipeline": {"colocate": True, "max_staleness": 0}, "learner": {"offload_states": True}}, "has none"),
    ({"generator": {"sleep_level": 0}}, "only for roles that take turns"),
    ({"weights": {"backend": "ipc"}}, "only for roles that take turns"),
])
def test_settings_for_a_shared_gpu_are_refused_where_there_is_none(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_the_hand_overs_are_vllm_032s_api():
    """What the generator, the learner and the IPC receiver call exists in the installed vLLM with these
    arguments, and the IPC receiver is vLLM's own with the tied head refreshed (as every other receiver)."""
    from vllm import LLM
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCTrainerInitInfo,
        IPCTrainerWeightTransferEngine,
        IPCWeightTransferEngine,
    )

    from pipeline.transport.vllm_weights import register, tied_ipc_worker_engine

    assert list(inspect.signature(LLM.sleep).parameters)[1:] == ["level", "mode"]
    assert list(inspect.signature(LLM.wake_up).parameters)[1:] == ["tags"]
    register()
    worker = WeightTransferEngineFactory._registry[BACKEND_IPC]()
    assert worker is tied_ipc_worker_engine() and issubclass(worker, IPCWeightTransferEngine)
    assert "finish_weight_update" in worker.__dict__
    info = IPCTrainerInitInfo(rank=1, packed=True, packed_buffer_size_bytes=2**20)
    assert not info.is_sender and IPCTrainerInitInfo(rank=0).is_sender
    assert WeightTransferTrainerFactory._registry[IPCTrainerInitInfo.backend]
    assert IPCTrainerInitInfo.backend == BACKEND_IPC and IPCTrainerWeightTransferEngine.init_info_cls is IPCTrainerInitInfo
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    from learner.learner import Learner

    assert {OffloadStateTypeEnum(k) for k in Learner.OFFLOADED} <= set(OffloadStateTypeEnum)


def test_a_generator_that_frees_memory_asks_vllm_for_sleep_mode():
    from actors.generator import _engine_options

    cfg = load_config(overrides=GPU)
    assert _engine_options(cfg.generator, cfg.sleep_level()) == {"enable_sleep_mode": True}
    assert _engine_options(cfg.generator, 0) == {} and _engine_options(cfg.generator, None) == {}
