"""Continuous generation (generator.update_mode = "continuous"): a generator's engine that never waits for a call.

In the other modes a generate call hands vLLM one chunk of a step's prompts and returns when its slowest
sequence is done: the engine idles through the tail of every call and between calls. Here a thread of the
generator steps vLLM's engine for as long as it holds work, and the driver talks to it in two calls:

- `admit(key, prompts, n, seed, need)` queues a chunk of prompt groups and returns at once. Groups enter the
  engine oldest `need` first and otherwise in the order they were queued, a whole group (its `n` completions) at a time, as soon as the engine has
  room (`capacity` sequences running) and this generator holds weights version `need` or newer (the staleness
  bound: a group of step s needs version s - 1 - max_staleness, so every token it samples is at least that);
- `take(key)` returns the chunk's rollout table once every completion of its groups is finished.

So the groups of later steps fill the engine while the last sequences of a step finish and while the learner
trains, and the learner's batch of step s is the groups of step s, whole (GRPO normalises within a group), taken
oldest step first. New weights land between two decoding steps whenever they arrive (the protocol calls of the
in-flight mode, on the generator's weights thread): sequences still running go on under the new version, their
KV cache recomputed under it (vLLM re-prefills them), and each token keeps the version that sampled it
(`behavior_versions`), so a partial rollout spans versions and every behaviour log-prob is exactly that of
the version that drew its token.

Where a version lands depends on when the learner finishes a step, so two runs of one seed sample the same
groups with the same seeds but may switch weights at different tokens (as on any asynchronous system).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.data.schema import PROMPT_SCHEMA

if TYPE_CHECKING:
    from actors.generator import GenerateStats, Generator


@dataclass
class StreamChunk:
    """One queued chunk: its prompt rows, one request per completion, and what is finished of it."""

    key: str
    rows: dict
    n: int
    need: int  # the weights version its groups wait for before they enter the engine
    prompt_of: list[int]  # request j completes prompt row prompt_of[j]
    params: list
    ids: list[str]
    admitted: int = 0  # groups in the engine so far
    first_admitted: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)  # request id -> vLLM's finished output
    result: tuple[pa.Table, Any] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.rows["group_id"])


class EngineStopped(RuntimeError):
    """The stream's engine thread ended (its engine failed, or the stream was reset) with this chunk unfinished."""


class Stream:
    """The engine loop of a continuous generator (see the module's docstring); owned by a `Generator`."""

    def __init__(self, gen: Generator, capacity: int) -> None:
        self.gen, self.capacity = gen, capacity
        self.cv = threading.Condition()
        self.queue: deque[StreamChunk] = deque()  # chunks with groups still to admit, in admission order
        self.chunks: dict[str, StreamChunk] = {}  # every chunk not yet taken, by key
        self.owner: dict[str, StreamChunk | None] = {}  # request id -> its chunk (None: a direct request, `run`)
        self.direct: list[tuple[str, list[int], Any]] = []  # direct requests not yet in the engine
        self.finished: dict[str, Any] = {}  # direct requests' outputs
        self.running = 0  # stream sequences in the engine
        self.busy_s = self.idle_s = 0.0  # engine seconds stepping / with nothing to step, since the last take
        self.error: BaseException | None = None
        self.dropped: set[str] = set()  # keys dropped by `reset`: their take calls fail at once
        self.generation = 0  # bumped by `reset`: chunks of an earlier generation are dropped
        self.thread = threading.Thread(target=self._loop, name="probe-rl-stream", daemon=True)
        self.thread.start()

    # --- the driver's side ---------------------------------------------------------------------------------

    def admit(self, key: str, prompts: pa.Table, n: int, seed: int | None, need: int) -> int:
        """Queue a chunk of prompt groups; returns how many chunks are queued or running, this one included."""
        assert prompts.schema.equals(PROMPT_SCHEMA), prompts.schema
        rows = prompts.to_pydict()
        params, prompt_of = self.gen._requests(rows, n, seed)
        ids = [f"{key}-{j}" for j in range(len(params))]
        chunk = StreamChunk(key, rows, n, need, prompt_of, params, ids)
        with self.cv:
            self._raise_if_stopped(key)
            if key in self.chunks:
                raise ValueError(f"chunk {key} is already queued on this generator")
            self.chunks[key] = chunk
            # oldest version first, then in arrival order: a chunk sent again (its first generator died) goes
            # ahead of later steps' chunks that wait for a version its own rows are needed to train
            at = len(self.queue)
            while at and self.queue[at - 1].need > need:
                at -= 1
            self.queue.insert(at, chunk)
            self.cv.notify_all()
            return len(self.chunks)

    def take(self, key: str, timeout_s: float) -> tuple[pa.Table, GenerateStats]:
        """Wait for chunk `key` (queued now or soon: the driver's admit call may still be on its way) to finish."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while (self.chunks.get(key) is None or self.chunks[key].result is None) and self.error is None:
                if key in self.dropped:
                    raise EngineStopped(f"generator: chunk {key} was dropped (the run went back to a checkpoint)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"generator: chunk {key} not finished after {timeout_s:.0f} s "
                                       f"({'queued' if key in self.chunks else 'never queued'})")
                self.cv.wait(min(left, 1.0))
            self._raise_if_stopped(key)
            return self.chunks.pop(key).result

    def run(self, prompt_ids: list[list[int]], params: list, prefix: str) -> tuple[list, list[str]]:
        """Requests outside the stream (greedy evaluation), stepped by the stream's thread beside its groups."""
        ids = [f"{prefix}-{i}" for i in range(len(prompt_ids))]
        with self.cv:
            self._raise_if_stopped("direct requests")
            for rid, prompt, sp in zip(ids, prompt_ids, params, strict=True):
                self.direct.append((rid, prompt, sp))
                self.owner[rid] = None
            self.cv.notify_all()
            while not all(rid in self.finished for rid in ids) and self.error is None:
                self.cv.wait(1.0)
            self._raise_if_stopped("direct requests")
            return [self.finished.pop(rid) for rid in ids], ids

    def reset(self) -> int:
        """Drop every chunk, queued or running (the driver restarted from a checkpoint and relaunches them); returns
        how many. Their requests are aborted in the engine."""
        with self.cv:
            dropped = list(self.chunks.values())
            self.dropped.update(self.chunks)
            rids = [rid for rid, c in self.owner.items() if c is not None]
            self.chunks.clear()
            self.queue.clear()
            for rid in rids:
                del self.owner[rid]
            self.running = 0
            self.generation += 1
            if rids:
                with self.gen._client:
                    self.gen.llm.llm_engine.abort_request(rids)
            self.cv.notify_all()
            return len(dropped)

    def poke(self) -> None:
        """Something the admission rule reads changed (a weights version landed)."""
        with self.cv:
            self.cv.notify_all()

    def _raise_if_stopped(self, what: str) -> None:
        if self.error is not None:
            raise EngineStopped(f"generator: the engine loop stopped ({self.error}); {what} cannot finish")

    # --- the engine's side -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Admit what may enter, take one decoding step, route what finished; with nothing to step, wait. Admission
        and the step both happen in the engine's turn, so neither meets a weight update half-done."""
        from contextlib import ExitStack

        from pipeline.faults import maybe_slow_down

        gen = self.gen
        engine = gen.llm.llm_engine
        working, busy = ExitStack(), False  # pipeline.cores = "phase": the process counts as busy while it has work
        try:
            while True:
                started = time.perf_counter()
                with gen._step_turn():
                    with self.cv:
                        self._admit(engine)
                    stepping = engine.has_unfinished_requests()
                    if stepping:
                        if not busy:
                            working.enter_context(gen.cores.working())
                            gen._fit_threads()
                            busy = True
                        if not gen.separate:
                            maybe_slow_down("decode_step")  # tests: decoding steps as slow as a large model's
                        outs = engine.step()
                        gen.steps += 1
                        done = [o for o in outs if o.finished]
                        if done:
                            self._finish(done)
                if stepping:
                    self.busy_s += time.perf_counter() - started
                    continue
                with self.cv:
                    working.close()
                    busy = False
                    if not self._admissible():
                        waited = time.perf_counter()
                        self.cv.wait(1.0)
                        self.idle_s += time.perf_counter() - waited
        except BaseException as e:  # noqa: BLE001 - every waiter is told; a dead engine ends the process
            from actors.generator import _exit_if

            with self.cv:
                self.error = e
                self.cv.notify_all()
            _exit_if(gen._engine_dead())
        finally:
            working.close()

    def _admissible(self) -> bool:
        """Something may enter the engine now (under the condition's lock)."""
        return bool(self.direct) or bool(self.queue and self.gen.version >= self.queue[0].need)

    def _admit(self, engine) -> None:
        """Put direct requests, then whole queued groups, into the engine (under the condition's lock)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        def add(rid: str, prompt: list[int], sp) -> None:
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            with self.gen._client:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompt)), sp)

        for rid, prompt, sp in self.direct:
            add(rid, prompt, sp)
        self.direct.clear()
        while self.queue:
            chunk = self.queue[0]
            if self.gen.version < chunk.need or (self.running and self.running + chunk.n > self.capacity):
                return
            if chunk.first_admitted is None:
                chunk.first_admitted = time.perf_counter()
            g = chunk.admitted
            for j in range(g * chunk.n, (g + 1) * chunk.n):
                self.owner[chunk.ids[j]] = chunk
                add(chunk.ids[j], chunk.rows["prompt_ids"][chunk.prompt_of[j]], chunk.params[j])
            self.running += chunk.n
            chunk.admitted += 1
            if chunk.admitted == chunk.num_groups:
                self.queue.popleft()

    def _finish(self, outs: list) -> None:
        """Route finished requests to their chunks; a chunk whose every completion is in becomes its table (built
        here, between two decoding steps, so the probe reads it takes from vLLM's workers are never mid-step)."""
        from actors.generator import GenerateStats, _oldest

        complete = []
        with self.cv:
            for out in outs:
                if out.request_id not in self.owner:
                    continue  # a request of a chunk dropped by `reset`
                chunk = self.owner.pop(out.request_id)
                if chunk is None:
                    self.finished[out.request_id] = out
                    continue
                chunk.outputs[out.request_id] = out
                self.running -= 1
                if len(chunk.outputs) == len(chunk.ids):
                    complete.append((chunk, self.generation))
            self.cv.notify_all()
        for chunk, generation in complete:
            table, tokens = self.gen._table(chunk.rows, chunk.prompt_of, chunk.ids,
                                            [chunk.outputs[rid] for rid in chunk.ids])
            with self.cv:
                if generation != self.generation:
                    continue
                stats = GenerateStats(self.busy_s, tokens, _oldest(table, self.gen.version), time.time(),
                                      self.gen._threads_used(), idle_s=self.idle_s,
                                      span_s=time.perf_counter() - chunk.first_admitted)
                self.busy_s = self.idle_s = 0.0
                chunk.result = (table, stats)
                self.cv.notify_all()
