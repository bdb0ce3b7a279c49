"""Generator: a vLLM engine that turns prompt tables into rollout tables, and takes new weights.

A plain class; `pipeline/loop/remote.py` makes it a Ray actor. New weights arrive through vLLM's own RL
weight-transfer protocol, whichever transport carries them (pipeline/transport/weights.py):

- collective: the learner's trainer-side engine calls `init_weight_transfer_engine`, `start_weight_update`,
  `update_weights` and `finish_weight_update` on this actor (through `pipeline.loop.remote.ReceiverClient`), and
  the bytes go straight from learner rank 0 into vLLM's workers;
- object store: `load_weights` takes a `WireWeights` from Ray's object store and feeds it through the same
  four calls with probe-rl's inline backend.

vLLM's engine core runs in this process or in a separate one (`generator.engine_process`); weights land the
same way in both, since the receiving engine lives in vLLM's workers and is registered there as a plugin.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import GeneratorConfig
from pipeline.data.schema import PROMPT_SCHEMA, ROLLOUT_SCHEMA
from pipeline.faults import maybe_die, maybe_slow_down

if TYPE_CHECKING:
    import torch

    from pipeline.transport.weights import WireWeights

WEIGHTS_WAIT_S = 900.0  # how long a generate call waits for the weights version published before it
INLINE_CHUNK_BYTES = 256 * 2**20  # object-store weights enter the engine in chunks of about this size


@dataclass(frozen=True)
class GenerateStats:
    seconds: float
    num_tokens: int  # completion tokens generated
    policy_version: int
    end_time: float = 0.0  # wall clock when the table was done (a scorer's queueing time starts here)
    threads: float = 0.0  # CPU threads vLLM's workers sampled on, all ranks together (pipeline.cores; 0: GPUs)
    idle_s: float = 0.0  # continuous mode: seconds the engine had nothing to step, since the previous chunk
    span_s: float = 0.0  # continuous mode: first group of the chunk admitted to its table done


def completion_seed(seed: int, group_id: int, index: int) -> int:
    """The sampling seed of completion `index` of prompt group `group_id` (group ids are unique across a run's
    steps): a hash of the run's seed, the group and the index, so no two completions of a run share a random
    stream, and a completion does not depend on which generator got it or which prompts shared its batch.

    vLLM seeds child k of a request with n > 1 as `seed + k`, so per-group bases that differ by one (the
    scheme this replaces) made completion k of group g+1 replay completion k+1 of group g: a 64 x 8 step
    drew 71 distinct streams, not 512. Each completion is therefore its own request (n = 1) with its own seed."""
    digest = hashlib.blake2b(f"{seed}/{group_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def configure_env(cfg: GeneratorConfig, on_gpu: bool, reads_probes: bool = False, ipc: bool = False) -> None:
    """Environment vLLM reads when the engine starts; must run before the engine is built in this process."""
    separate = cfg.engine_process == "separate" or (cfg.engine_process == "auto" and on_gpu)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if separate else "0"
    from pipeline.transport.vllm_weights import NO_ONEDNN_ENV

    # weights that land from the weights thread: vLLM's oneDNN linear handlers would keep the old ones on some CPUs
    os.environ[NO_ONEDNN_ENV] = "1" if cfg.update_mode != "between_steps" else "0"
    if ipc and separate:
        # CUDA IPC handles (the colocated learner rank's: weights.backend "ipc") hold torch types that vLLM's
        # msgpack carries to its engine process only through its pickle fallback, which it refuses without this.
        # They come from the learner's own process, never from a file.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if reads_probes:
        # vLLM keys its compiled-graph cache by model and engine config, not by the hooks traced into the graph:
        # an engine reading probes must neither load a graph compiled without them nor leave one for an engine
        # without them. It compiles afresh at every start (Inductor's own cache, keyed by graph, still applies).
        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    # vLLM caches what it read from the environment once an engine started; a process that builds another engine
    # (tests, benchmarks) must have these values read afresh.
    from vllm import envs

    envs.disable_envs_cache()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # actors share cores; let the OS place threads
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.num_cpus))))


@contextmanager
def _sampler_ops_eager(eager: bool) -> Iterator[None]:
    """vLLM wraps a few small sampler ops in torch.compile even with enforce_eager (the rank of each sampled
    token among the log-probs): the first sampling call with log-probs traces them, seconds of CPU at every
    engine start for ops that take microseconds eagerly (benchmarks/bench_generator_start.py). An eager CPU engine
    runs them eagerly: TorchDynamo is off in this process and in the engine and worker processes started while
    the engine is built (spawned ones read the environment, forked ones inherit the flag); a compiled engine
    turns it back on for the processes it starts."""
    import torch._dynamo

    before = os.environ.get("TORCHDYNAMO_DISABLE")
    off = eager or before == "1"  # a user's TORCHDYNAMO_DISABLE=1 holds either way
    torch._dynamo.config.disable = off
    os.environ["TORCHDYNAMO_DISABLE"] = "1" if off else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


WORKER_DIED = "a vLLM worker process of this generator died"


def _dies_with_its_engine(method: Callable) -> Callable:
    """A call that fails because vLLM's engine died (a worker process killed: "Executor failed.", or its engine
    process gone) ends this process instead of returning the error. vLLM marks its executor failed at once but
    calls the failure callback (`Generator._exit_with_the_engine`) only after it has shut the other workers down,
    so on a busy machine the call in hand fails first: without this the driver would get an ordinary error from a
    generator that is about to exit, and stop the run, instead of a dead generator that it replaces."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            _exit_if(self._engine_dead())
            raise

    return call


class Generator:
    def __init__(self, *, model_path: str, cfg: GeneratorConfig, weight_backend: str, dtype: str = "float32",
                 seed: int = 0, ablation: tuple[int, list[float]] | None = None,
                 probes: list[tuple[str, str, str | None]] = (), sleep_level: int | None = None,
                 stream_capacity: int = 256) -> None:
        """`ablation` (layer, unit direction): shaping.kind = "ablate" projects that direction out of the residual
        stream at that layer while sampling rollouts (greedy evaluation runs without it). `probes` (name, stem,
        aggregation override): probes read inside the sampling pass; each sampled table gains their columns.
        `sleep_level` (pipeline.colocate): how `sleep` frees the engine while the learner trains (1 and 2 need
        vLLM's sleep mode, which GPUs have). `stream_capacity`: update_mode "continuous", the sequences its engine
        holds at once (actors/stream.py)."""
        import torch

        from pipeline.cores import CoreShare
        from probes.probe import load_probe

        self.cfg = cfg
        on_gpu = cfg.num_gpus > 0 and torch.cuda.is_available()
        self.cores = CoreShare.for_role(max(1, int(cfg.num_cpus)), cpu=not on_gpu)  # pipeline.cores: threads per phase
        self._engine_threads = self.cores.own  # what vLLM's workers compute on (OMP_NUM_THREADS below)
        configure_env(cfg, on_gpu, reads_probes=bool(probes), ipc=weight_backend == "ipc")
        self.sleep_level = sleep_level
        if not on_gpu:
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        from vllm import LLM, SamplingParams
        from vllm.config import WeightTransferConfig
        from vllm.inputs import TokensPrompt

        from pipeline.transport.vllm_weights import register
        from pipeline.transport.vllm_worker import EXTENSION

        register()  # in this process; vLLM's engine process loads it through the vllm.general_plugins entry point
        self.probes = []
        for name, stem, aggregation in probes:
            probe = load_probe(stem)
            probe.name = name
            if aggregation is not None:
                probe.aggregation = aggregation
            self.probes.append(probe)
        loader = _probe_loader(self.probes, model_path)
        extra = _engine_options(cfg, sleep_level)
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu or bool(ablation)
        try:
            with _sampler_ops_eager(eager and not on_gpu):
                self.llm = LLM(
                    model=model_path, dtype=dtype, seed=seed, enforce_eager=eager,
                    tensor_parallel_size=cfg.tensor_parallel_size,
                    distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None,
                    max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                    enable_prefix_caching=cfg.enable_prefix_caching,
                    weight_transfer_config=WeightTransferConfig(backend=weight_backend),
                    worker_extension_cls=EXTENSION, **loader, **extra,
                )
        except ValueError as e:
            if "weight transfer backend" in str(e):
                raise ValueError(f"{e}. vLLM's engine process loads probe-rl's backends from the vllm.general_plugins "
                                 "entry point: install probe-rl on every node (pip install -e .)") from None
            raise
        self._exit_with_the_engine()
        self.weight_backend = weight_backend
        self.version = 0
        self.updating = False  # a weight update session is open (start_weight_update without its finish yet)
        self.in_flight = cfg.update_mode in ("in_flight", "continuous")  # weights land between decoding steps
        self.separate = type(self.llm.llm_engine.engine_core).__name__ != "InprocClient"  # vLLM's engine process
        # In-flight updates in an in-process engine: the generate loop and the weight calls (another thread) take
        # turns at the engine, one decoding step at a time; an open update session holds the steps back.
        self._turn = threading.Condition()
        self._stepping, self._holders, self._calls = False, 0, 0
        # vLLM's client to a separate engine process talks over one ZeroMQ socket, which is not thread-safe:
        # adding requests (the generate thread) and weight calls (the weights thread) take this lock.
        self._client = threading.RLock()
        self.steps = 0  # decoding steps run (engine.step calls)
        self.stream = None  # update_mode "continuous": the thread that steps the engine (started below)
        self.llm.llm_engine.set_weight_version("0")
        if self.separate and "decode_step" in os.environ.get("PROBE_RL_SLOW", ""):
            self.llm.collective_rpc("probe_rl_slow_steps")  # tests: vLLM's engine process steps by itself
        self.ablation = ablation
        if ablation is not None:
            self._ablate(True)
        if self.probes:
            self.llm.collective_rpc("probe_rl_reads_start", args=self._probe_tensors())
        # The first sampling call with log-probs pays a one-off warm-up (on GPUs vLLM compiles its sampler ops then);
        # pay it at start-up. A one-token prompt as the engine's first request is also the case that killed bf16
        # engines on CPUs with AMX before the plugin asked for AMX permission (vllm_weights.allow_amx).
        self.greedy([[0]], 2)
        self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(n=2, max_tokens=2, logprobs=0,
                          detokenize=False), use_tqdm=False)
        if cfg.update_mode == "continuous":  # from here on one thread of this actor steps the engine
            from actors.stream import Stream

            self.stream = Stream(self, stream_capacity)

    # --- continuous generation (actors/stream.py) ------------------------------------------------------------

    def admit(self, key: str, prompts: pa.Table, n: int, seed: int | None, need: int) -> int:
        """Queue a chunk of prompt groups for the engine; returns at once (its own concurrency group)."""
        maybe_die("generator")
        return self.stream.admit(key, prompts, n, seed, need)

    @_dies_with_its_engine
    def take(self, key: str, timeout_s: float) -> tuple[pa.Table, GenerateStats]:
        """Chunk `key`'s rollout table, once its every completion is done."""
        return self.stream.take(key, timeout_s)

    def reset_stream(self) -> int:
        """Drop every queued and running chunk (the run restarted from a checkpoint); returns how many. Called in
        the stream concurrency group: take calls of the dropped chunks may hold the default one, and fail now."""
        return self.stream.reset() if self.stream is not None else 0

    @_dies_with_its_engine
    def generate(self, prompts: pa.Table, n: int, seed: int | None,
                 min_version: int = 0) -> tuple[pa.Table, GenerateStats]:
        """`n` sampled completions per prompt row; rows come out grouped by prompt, in prompt order. Each completion
        samples with its own seed (`completion_seed`); `seed` None samples unseeded. Sampling starts only once this
        generator holds weights version `min_version` (the newest the driver had published when it launched the
        call): in-flight updates load in a concurrency group of their own, so a load queued before this call
        may still be on its way."""
        with self.cores.working():  # pipeline.cores = "phase": the node's idle cores too, for this call
            return self._generate(prompts, n, seed, min_version)

    def _fit_threads(self) -> None:
        """vLLM's workers compute on the threads `self.cores` fits now, split over the tensor-parallel ranks (set
        in each worker: the actor's process, or vLLM's engine and worker processes)."""
        n = max(1, self.cores.fit() // self.cfg.tensor_parallel_size)
        if self.cores.phase and n != self._engine_threads:
            with self._client:
                self.llm.collective_rpc("probe_rl_set_threads", args=(n,))
            self._engine_threads = n

    def _generate(self, prompts: pa.Table, n: int, seed: int | None, min_version: int) -> tuple[pa.Table, GenerateStats]:
        assert prompts.schema.equals(PROMPT_SCHEMA), prompts.schema
        maybe_die("generator")
        start = time.perf_counter()
        self._await_version(min_version)
        self._fit_threads()
        maybe_slow_down("generator")  # tests: a generation that takes as long as a real one
        rows = prompts.to_pydict()
        params, prompt_of = self._requests(rows, n, seed)
        outputs, ids = self._run([rows["prompt_ids"][i] for i in prompt_of], params)
        table, num_tokens = self._table(rows, prompt_of, ids, outputs)
        return table, GenerateStats(time.perf_counter() - start, num_tokens, _oldest(table, self.version), time.time(),
                                    self._threads_used())

    def _threads_used(self) -> float:
        return self._engine_threads * self.cfg.tensor_parallel_size if self.cores.cpu else 0.0

    def _requests(self, rows: dict, n: int, seed: int | None) -> tuple[list, list[int]]:
        """vLLM's sampling parameters of `n` completions of each prompt row, and the row each belongs to: one request
        per completion, each with its own random stream (`completion_seed`)."""
        from vllm import SamplingParams

        params, prompt_of = [], []
        for i, g in enumerate(rows["group_id"]):
            for k in range(n):
                params.append(SamplingParams(n=1, temperature=self.cfg.temperature, max_tokens=self.cfg.max_new_tokens,
                                             logprobs=0, seed=None if seed is None else completion_seed(seed, g, k),
                                             detokenize=False))
                prompt_of.append(i)
        return params, prompt_of

    def _table(self, rows: dict, prompt_of: list[int], ids: list[str], outputs: list) -> tuple[pa.Table, int]:
        """The rollout table of finished requests `ids` (row `prompt_of[j]` of `rows` each), in their order, and its
        completion tokens; probes read in the sampling pass add their columns."""
        cols: dict[str, list] = {f.name: [] for f in ROLLOUT_SCHEMA}
        num_tokens = 0
        read = self.llm.collective_rpc("probe_rl_take_scores", args=(ids,))[0] if self.probes else {}
        tokens: list[list[list[float]]] = []  # per row, per probe: scores of completion tokens 0..T-2
        for i, rid, out in zip(prompt_of, ids, outputs, strict=True):
            comp = out.outputs[0]
            if self.probes:
                tokens.append(completion_reads(read.get(rid), len(rows["prompt_ids"][i]), len(comp.token_ids),
                                               len(self.probes)))
            token_ids = list(comp.token_ids)
            # logprobs=0 returns exactly the sampled token's log-prob at each step; the engine reports them at the
            # sampling temperature (logprobs_mode "processed_logprobs"), the distribution that drew the token
            logprobs = [step[tok].logprob for step, tok in zip(comp.logprobs, token_ids, strict=True)]
            cols["prompt_id"].append(rows["prompt_id"][i])
            cols["group_id"].append(rows["group_id"][i])
            cols["prompt_ids"].append(rows["prompt_ids"][i])
            cols["completion_ids"].append(token_ids)
            cols["behavior_logprobs"].append(logprobs)
            versions = token_versions(comp.weight_versions, len(token_ids), self.version)
            cols["behavior_versions"].append(versions)
            cols["policy_version"].append(min(versions, default=self.version))
            cols["answer"].append(rows["answer"][i])
            num_tokens += len(token_ids)
        table = pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)
        if self.probes:
            table = self._with_probe_columns(table, tokens)
        return table, num_tokens

    def _run(self, prompt_ids: list[list[int]], params: list) -> tuple[list, list[str]]:
        """vLLM's outputs for these prompts, in their order, and their request ids (what vLLM's workers know each
        by, less a random suffix): LLM.generate's loop, with a turn at the engine per decoding step so that an
        in-flight weight update lands between two steps."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        self._calls += 1
        if self.stream is not None:  # its thread steps the engine: these requests join it there
            return self.stream.run(prompt_ids, params, f"c{self._calls}")
        ids = [f"c{self._calls}-{i}" for i in range(len(prompt_ids))]
        with self._client:
            for rid, prompt, sp in zip(ids, prompt_ids, params, strict=True):
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompt)), sp)
        done = {}
        while engine.has_unfinished_requests():
            if not self.separate:
                maybe_slow_down("decode_step")  # tests: decoding steps as slow as a large model's
            with self._step_turn():
                outs = engine.step()
            self.steps += 1
            for out in outs:
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids], ids

    def _await_version(self, version: int, timeout_s: float = WEIGHTS_WAIT_S) -> None:
        with self._turn:
            if not self._turn.wait_for(lambda: self.version >= version, timeout_s):
                raise RuntimeError(f"generator: still on weights version {self.version} after {timeout_s:.0f} s, "
                                   f"but version {version} was published before this generate call")

    @contextmanager
    def _step_turn(self):
        """One decoding step of an in-process engine, never while a weight call holds it or a session is open."""
        if self.separate:
            yield  # vLLM's engine process steps on its own; an update session pauses its scheduler instead
            return
        with self._turn:
            self._turn.wait_for(lambda: self._holders == 0 and not self.updating)
            self._stepping = True
        try:
            yield
        finally:
            with self._turn:
                self._stepping = False
                self._turn.notify_all()

    @contextmanager
    def _weights_turn(self):
        """A weight call (another thread when updates are in flight): waits for the decoding step under way (an
        in-process engine) or holds the client's socket (vLLM's separate engine process)."""
        if self.separate:
            with self._client:
                yield
            return
        with self._turn:
            self._holders += 1
            self._turn.wait_for(lambda: not self._stepping)
        try:
            yield
        finally:
            with self._turn:
                self._holders -= 1
                self._turn.notify_all()

    # --- probes read in the sampling pass --------------------------------------------------------------------

    def _probe_tensors(self) -> tuple[list[list[float]], list[float]]:
        return [p.weight.float().tolist() for p in self.probes], [float(p.bias.reshape(-1)[0]) for p in self.probes]

    def _with_probe_columns(self, table: pa.Table, tokens: list[list[list[float]]]) -> pa.Table:
        """Append `probe/<name>/tokens` (scores of completion tokens 0..T-2) and `probe/<name>/score` (their
        aggregate, the probe's own way, as the scorers aggregate) for each generator-read probe."""
        from pipeline.data.schema import probe_score_field, probe_token_field
        from probes.probe import aggregate_ragged

        for k, probe in enumerate(self.probes):
            per_row = [row[k] for row in tokens]
            agg = aggregate_ragged(per_row, probe.aggregation)
            table = table.append_column(probe_token_field(probe.name), pa.array(per_row, pa.list_(pa.float32())))
            table = table.append_column(probe_score_field(probe.name), pa.array(agg, pa.float32()))
        return table

    @_dies_with_its_engine
    def set_probe(self, name: str, tensors: dict) -> None:
        """A refit probe: its new weights copied in place into the tensors vLLM's compiled forward reads."""
        probe = next(p for p in self.probes if p.name == name)
        assert tensors["weight"].shape == probe.weight.shape
        probe.weight, probe.bias = tensors["weight"].float(), tensors["bias"].float().reshape(1)
        with self._weights_turn():
            self.llm.collective_rpc("probe_rl_set_read_probes", args=self._probe_tensors())

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    # --- vLLM's weight-transfer protocol, called by the learner's trainer-side engine ----------------------

    @_dies_with_its_engine
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        with self._weights_turn():
            self.llm.init_weight_transfer_engine({"init_info": init_info})

    @_dies_with_its_engine
    def shutdown_weight_transfer_engine(self) -> None:
        with self._weights_turn():
            self.llm.shutdown_weight_transfer_engine()

    @_dies_with_its_engine
    def start_weight_update(self) -> None:
        with self._weights_turn():
            if self.updating:
                # The last send stopped part-way (another receiver or the sender died) and is being resent whole:
                # close the abandoned session (vLLM refuses to open a second one), keeping the version it held.
                self.llm.finish_weight_update(str(self.version))
            elif self.in_flight and self.separate:
                # vLLM's engine process steps by itself: freeze its requests where they are for the update
                self.llm.llm_engine.engine_core.call_utility("pause_scheduler", "keep", False)
            self.llm.start_weight_update()
            self.updating = True

    @_dies_with_its_engine
    def update_weights(self, update_info: dict) -> None:
        with self._weights_turn():
            try:
                self.llm.update_weights({"update_info": update_info})
            except BaseException:
                self._session_closed()  # vLLM closes a session whose update failed
                raise

    @_dies_with_its_engine
    def finish_weight_update(self, weight_version: str) -> int:
        with self._weights_turn():
            self.llm.finish_weight_update(weight_version)
            # Unfinished sequences (in-flight updates) are preempted and re-prefilled under the new weights, so
            # the log-prob of every token sampled from here on is the new version's, prefix included.
            self.llm.reset_prefix_cache(reset_running_requests=self.in_flight)
            self.version = int(weight_version)
            self._session_closed()
        if self.stream is not None:
            self.stream.poke()  # groups waiting for this version may enter the engine
        return self.version

    # --- taking turns with the learner (pipeline.colocate) ----------------------------------------------------

    @_dies_with_its_engine
    def sleep(self) -> float:
        """Give the device to the learner: vLLM's sleep at `sleep_level` (0 pauses its scheduler; 1 moves its
        weights to host memory and frees the KV cache; 2 frees both). Nothing may be generating. Seconds taken."""
        start = time.perf_counter()
        with self._client:
            self.llm.sleep(level=self.sleep_level or 0)
        return time.perf_counter() - start

    @_dies_with_its_engine
    def wake_up(self, tags: list[str] | None = None) -> float:
        """Take the device back, `tags` of it (vLLM's: "weights", "kv_cache"; None: all): after level 1 or 2 the
        weights first (the learner's next version is then copied into them in place), the KV cache after the
        update; after level 0, "scheduling". Seconds taken."""
        start = time.perf_counter()
        with self._client:
            self.llm.wake_up(tags if self.sleep_level else ["scheduling"])
        return time.perf_counter() - start

    def _session_closed(self) -> None:
        if self.in_flight and self.separate and self.updating:
            self.llm.llm_engine.engine_core.call_utility("resume_scheduler")
        with self._turn:
            self.updating = False
            self._turn.notify_all()

    def load_weights(self, weights: WireWeights | dict[str, torch.Tensor], version: int) -> int:
        """The object-store transport: `WireWeights` (or a state dict) as version `version`, through the same
        protocol with the inline backend, in chunks so the engine process never holds two full copies (each of those
        calls dies with a dead engine itself)."""
        from pipeline.transport.weights import dtype_name, from_wire

        named = from_wire(weights)
        self.start_weight_update()
        chunk, size = [], 0
        for name, tensor in named.items():
            chunk.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= INLINE_CHUNK_BYTES:
                self.update_weights(_inline_info(chunk, dtype_name))
                chunk, size = [], 0
        if chunk:
            self.update_weights(_inline_info(chunk, dtype_name))
        return self.finish_weight_update(str(version))

    @_dies_with_its_engine
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int, ablated: bool = False) -> list[list[int]]:
        """Greedy completions (token ids), for evaluation and the weight-sync check: of the policy itself, without
        the training-time ablation unless `ablated`."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
        lift = self.ablation is not None and not ablated  # evaluate the policy itself, not its ablated twin
        if lift:
            self._ablate(False)
        try:
            with self.cores.working():
                self._fit_threads()
                outs, _ = self._run(prompt_ids, [params.clone() for _ in prompt_ids])
        finally:
            if lift:
                self._ablate(True)
        return [list(o.outputs[0].token_ids) for o in outs]

    def _ablate(self, on: bool) -> None:
        layer, direction = self.ablation if on else (None, None)
        self.llm.collective_rpc("probe_rl_set_ablation", args=(layer, direction))

    def _exit_with_the_engine(self) -> None:
        """A vLLM worker process that dies (a tensor-parallel rank killed, a device fault) would leave this actor
        alive around a dead engine, answering health pings and failing every call. Instead the actor's process
        exits with it, so Ray, and so the fleet, see a dead generator and replace it whole."""
        _, executor = self._engine_parts()
        if executor is None or not hasattr(executor, "register_failure_callback"):
            return  # one worker in this process, or vLLM's separate engine process: `_engine_dead` covers those
        previous = getattr(executor, "failure_callback", None)

        def exit_process() -> None:
            if previous is not None:
                previous()
            _exit(WORKER_DIED)

        executor.register_failure_callback(exit_process)

    def _engine_parts(self):
        """(vLLM's engine-core client, the in-process engine's model executor or None)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        return core, getattr(getattr(core, "engine_core", None), "model_executor", None)

    def _engine_dead(self) -> str:
        """Why this generator's vLLM engine is dead ("" while it is alive)."""
        core, executor = self._engine_parts()
        if getattr(executor, "is_failed", False):
            return WORKER_DIED
        if getattr(getattr(core, "resources", None), "engine_dead", False):
            return "its vLLM engine is dead"
        return ""

    def ready(self) -> int:
        return self.version

    def processes(self) -> tuple[str, list[int]]:
        """(Ray node id, pids) of this generator's process and every process under it (vLLM's engine core and
        workers): what must be gone, its device memory released, before a replacement starts in its place."""
        import psutil
        import ray

        me = psutil.Process()
        return ray.get_runtime_context().get_node_id(), [me.pid] + [c.pid for c in me.children(recursive=True)]

    def pid(self) -> int:
        """The health ping: this process's id, or the process ends here if its vLLM engine is dead."""
        _exit_if(self._engine_dead())
        return os.getpid()


def _engine_options(cfg: GeneratorConfig, sleep_level: int | None) -> dict:
    """vLLM engine arguments some generators pass: a token budget per step; sleep mode (vLLM's allocator that can
    free and restore its memory by tag) where it sleeps at level 1 or 2 (colocated on GPUs)."""
    out: dict = {"max_num_batched_tokens": cfg.max_num_batched_tokens} if cfg.max_num_batched_tokens else {}
    if sleep_level:
        out["enable_sleep_mode"] = True
    return out


def _probe_loader(probes, model_path: str) -> dict:
    """vLLM's engine arguments that load the model with probe reads (pipeline/transport/vllm_probes.py); {} without probes."""
    if not probes:
        return {}
    from transformers import AutoConfig

    from pipeline.transport.vllm_probes import EXTRA_KEY, LOAD_FORMAT, ReadSpec

    hf = AutoConfig.from_pretrained(model_path)
    for p in probes:
        p.check_fits(hf.num_hidden_layers, hf.hidden_size, model_name=model_path)
    spec = ReadSpec([p.layer for p in probes], hf.hidden_size)
    return {"load_format": LOAD_FORMAT, "model_loader_extra_config": {EXTRA_KEY: spec.to_dict()}}


def token_versions(spans: list[Any] | None, num_tokens: int, current: int) -> list[int]:
    """The weight version of each of a completion's tokens from vLLM's version spans (labels set by
    `finish_weight_update`); without spans, every token is of the `current` version."""
    if not spans:
        return [current] * num_tokens
    out = [current] * num_tokens
    for span in spans:
        for t in range(span.start, min(span.end, num_tokens)):
            out[t] = int(span.version)
    return out


def completion_reads(read: tuple[list[int], list[list[float]]] | None, prompt_len: int, completion_len: int,
                     num_probes: int) -> list[list[float]]:
    """Per probe, the scores of completion tokens 0..T-2 (positions P..P+T-2) from a worker's (positions, scores)
    of one request. The last token is never fed back, so it has no activation (pipeline/transport/vllm_probes.py)."""
    want = range(prompt_len, prompt_len + completion_len - 1)
    if not len(want):
        return [[] for _ in range(num_probes)]
    if read is None:
        raise RuntimeError(f"vLLM returned no probe scores for a completion of {completion_len} tokens")
    at = dict(zip(read[0], read[1], strict=True))
    missing = [p for p in want if p not in at]
    if missing:
        raise RuntimeError(f"vLLM returned no probe scores at positions {missing[:5]} of a completion (prompt "
                           f"{prompt_len} tokens, completion {completion_len})")
    return [[at[p][k] for p in want] for k in range(num_probes)]


def _oldest(table: pa.Table, current: int) -> int:
    """The oldest weight version any row of a rollout table began with (`current` for an empty one)."""
    return min(table.column("policy_version").to_pylist(), default=current)


def _exit(why: str) -> None:
    import sys

    print(f"generator (pid {os.getpid()}): {why}; exiting so that it is replaced", file=sys.stderr, flush=True)
    os._exit(1)


def _exit_if(why: str) -> None:
    """End this process, saying why, when `why` is not empty (`Generator._engine_dead`'s answer)."""
    if why:
        _exit(why)


def _inline_info(chunk, dtype_name) -> dict:
    import torch

    return {"names": [n for n, _ in chunk], "dtype_names": [dtype_name(t.dtype) for _, t in chunk],
            "shapes": [list(t.shape) for _, t in chunk],
            "data": [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for _, t in chunk]}
