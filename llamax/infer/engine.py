"""Continuous batching: many requests decoded together by one thread that owns the device.

    engine = Engine(config, params, max_batch=16, max_seq_len=1024)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64, stop_ids=(eos_id,)))
    for event in request:          # TokenEvents as they are produced; the last has finish_reason
        ...
    engine.stop()

Requests wait in a FIFO queue; whenever a slot is free the engine thread prefills the next one
into it (`llamax.infer.slots`), then runs ONE decode step that advances every active slot. A
request leaves its slot when it produces a stop id, reaches `max_tokens`, or is cancelled (a
client that went away); the slot is refilled before the next step. Compiled shapes: one prefill
per prompt-length bucket, and one decode step per (row bucket, window): a step runs only the
slots up to the highest one in use (1, 2, 4, ... max_batch rows), reading only the cache
positions up to the longest of them (128, 256, ... max_seq_len).

Greedy output is the same whether a request runs alone or among others, and equals
`llamax.sample.generate` on the same prompt (tests/test_engine.py). Events reach the caller
through a sink called on the engine thread: a thread-safe queue by default (iterate the
request), or any callable, e.g. one that hands events to an asyncio loop.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from llamax.config import ModelConfig
from llamax.errors import ConfigError, DataError
from llamax.infer.generate import bucket_length
from llamax.infer.row_sampling import TOP_LOGPROBS, make_sampling
from llamax.infer.slots import SlotProgram

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is continued.

    max_tokens: new tokens at most; temperature 0 is greedy; top_k 0 and top_p 1 switch those
    filters off; seed picks the sample stream; stop_ids end the sequence (the stop token is
    reported, finish_reason 'stop'); logprobs: how many alternatives per token to report (0..5),
    None for none.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One new token, or the end of a request (token None) when it ends without one."""

    token: int | None
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'error' on the last event
    error: str | None = None


class Request:
    """A submitted prompt: iterate it for its TokenEvents (default sink), `cancel()` to free its
    slot early. `prompt_tokens`/`completion_tokens` count what it used."""

    def __init__(self, request_id: int, prompt: list[int], sampling: SamplingParams,
                 sink: Callable[[TokenEvent], None] | None):
        self.id, self.prompt, self.sampling = request_id, prompt, sampling
        self._queue: queue.Queue | None = None if sink else queue.Queue()
        self._sink = sink or self._queue.put
        self._cancelled = threading.Event()
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot before its next step (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: TokenEvent) -> None:
        if event.token is not None:
            self.completion_tokens += 1
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        try:
            self._sink(event)
        except Exception:  # a consumer's failure must not take down the engine thread
            log.exception("request %d: event sink failed; cancelling it", self.id)
            self.cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's events as they come (default sink only); TimeoutError if none comes
        for `timeout` seconds."""
        if self._queue is None:
            raise TypeError("this request delivers its events to the sink given to submit()")
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event for {timeout} s") from None
            yield event
            if event.finish_reason:
                return

    def tokens(self, timeout: float | None = None) -> list[int]:
        """Blocks until the request ends; its new tokens (default sink only)."""
        return [event.token for event in self.events(timeout) if event.token is not None]


class Engine:
    """Owns the model on device and a thread that serves submitted requests in batches.

    Args:
      config, params: the model (params as `load_any`/`init_params` give them).
      max_batch: requests decoded together (slots).
      max_seq_len: prompt + new tokens per request (at most config.max_position_embeddings).
      mesh, rules: shard the model (see `llamax.infer.slots.SlotProgram`).
    """

    def __init__(self, config: ModelConfig, params: Any, *, max_batch: int = 8,
                 max_seq_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: Any = None):
        max_seq_len = max_seq_len or config.max_position_embeddings
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not 1 < max_seq_len <= config.max_position_embeddings:
            raise ConfigError(f"max_seq_len={max_seq_len} must be in [2, max_position_embeddings="
                              f"{config.max_position_embeddings}] of the model")
        if mesh is not None:
            from llamax.sharding import LOGICAL_AXIS_RULES, check_batch_size
            check_batch_size(max_batch, mesh, LOGICAL_AXIS_RULES if rules is None else rules)
        self.config, self.max_batch, self.max_seq_len = config, max_batch, max_seq_len
        self.program = SlotProgram(config, max_batch, max_seq_len, mesh, rules)
        data_parallel = 1
        if mesh is not None:
            from llamax.sharding import data_parallel_size
            data_parallel = data_parallel_size(mesh, self.program.rules)
        self._row_buckets = self.program.row_buckets(data_parallel)
        self._window_buckets = self.program.window_buckets()
        self.params = self.program.place_params(params)
        self._batch = self.program.empty()
        self._slots: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0  # decode steps run (for tests and stats)

    # ---- the caller's side ------------------------------------------------------------------

    def check(self, prompt: Sequence[int], sampling: SamplingParams) -> list[int]:
        """Raises DataError/ConfigError (ValueErrors, one line each) for a request the engine
        cannot run; returns the prompt as a list of ints."""
        try:
            prompt = [int(t) for t in prompt]
        except (TypeError, ValueError) as exc:
            raise DataError(f"the prompt must be a list of int token ids, got {prompt!r:.60}") from exc
        if not prompt:
            raise DataError("the prompt is empty; give at least one token (e.g. the BOS id)")
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise DataError(f"the prompt holds a token id outside the model vocabulary [0, {vocab})")
        s = sampling
        if not isinstance(s.max_tokens, int) or s.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {s.max_tokens!r}")
        if len(prompt) >= self.max_seq_len:
            raise DataError(f"the prompt has {len(prompt)} tokens; this server's context is "
                            f"max_seq_len={self.max_seq_len}, which leaves no room to generate")
        if len(prompt) + s.max_tokens > self.max_seq_len:
            raise DataError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({s.max_tokens}) = "
                f"{len(prompt) + s.max_tokens} exceeds the context max_seq_len={self.max_seq_len}; "
                f"ask for at most {self.max_seq_len - len(prompt)} tokens")
        if not s.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {s.temperature!r}")
        if not 0 < s.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {s.top_p!r}")
        if not 0 <= s.top_k <= vocab:
            raise ConfigError(f"top_k must be in [0, {vocab}] (0 = off), got {s.top_k!r}")
        if s.logprobs is not None and not 0 <= s.logprobs <= TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {s.logprobs!r}")
        if not 0 <= s.seed < 2 ** 32:  # jax.random.key keeps 32 bits without jax_enable_x64
            raise ConfigError(f"seed must be in [0, 2**32), got {s.seed!r}")
        bad_stops = [i for i in s.stop_ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))
                     or not 0 <= i < vocab]
        if bad_stops:  # a stop id the model cannot produce would silently never stop anything
            raise ConfigError(f"stop id {bad_stops[0]!r} is not a token id of the model vocabulary "
                              f"[0, {vocab}); were the stop ids taken from another tokenizer?")
        return prompt

    def submit(self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams(),
               sink: Callable[[TokenEvent], None] | None = None) -> Request:
        """Queues a request (checked first, see `check`); returns at once.

        `sink`, if given, is called on the engine thread with each TokenEvent and must not block.
        """
        request = Request(next(self._ids), self.check(prompt, sampling), sampling, sink)
        with self._lock:  # against stop(): a request is either refused or sure to get an end
            if self._thread is None or not self._thread.is_alive() or self._stopping.is_set():
                raise RuntimeError("the engine is not running; call Engine.start() first")
            self._inbox.put(request)
        return request

    def generate(self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams()) -> list[int]:
        """Blocking convenience: the new tokens of one request."""
        return self.submit(prompt, sampling).tokens()

    def start(self) -> "Engine":
        """Starts the engine thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="llamax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ends every open request (finish_reason 'cancelled') and joins the engine thread."""
        with self._lock:
            self._stopping.set()
            self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def warmup(self) -> None:
        """Compiles the decode step and every prefill bucket now instead of on first use."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("warm up before Engine.start(): the engine thread owns the device")
        length = 1
        while length < self.max_seq_len:
            self._start_request(Request(-1, [0] * length, SamplingParams(max_tokens=1), lambda e: None), 0)
            length = min(self._bucket(length), self.max_seq_len - 1) + 1
        for rows in self._row_buckets:
            for window in self._window_buckets:
                self._batch, _ = self.program.decode(self.params, self._batch, rows, window)

    @property
    def num_active(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            idle = self.num_active == 0 and not self._waiting
            self._take_inbox(block=idle)
            try:
                self._admit()
                if self.num_active:
                    self._step()
            except Exception as exc:  # a device error must not hang the callers
                log.exception("engine step failed; ending the affected requests")
                self._fail_all(f"{type(exc).__name__}: {exc}")
        self._take_inbox(block=False)  # requests submitted while stopping end too
        for request in [r for r in self._slots if r is not None] + list(self._waiting):
            request._emit(TokenEvent(None, finish_reason="cancelled"))
        self._waiting.clear()
        self._slots = [None] * self.max_batch

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Fills free slots from the waiting queue (FIFO)."""
        while self._waiting and None in self._slots:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()._emit(TokenEvent(None, finish_reason="cancelled"))
                continue
            self._start_request(request, self._slots.index(None))  # a failure leaves it queued
            self._waiting.popleft()

    def _bucket(self, length: int) -> int:
        return min(bucket_length(length), self.max_seq_len)

    def _start_request(self, request: Request, slot: int) -> None:
        length = len(request.prompt)
        tokens = np.zeros((1, self._bucket(length)), np.int32)
        tokens[0, :length] = request.prompt
        s = request.sampling
        sampling = make_sampling(s.temperature, s.top_k, s.top_p, s.seed)
        self._batch, first = self.program.prefill(self.params, self._batch, slot, tokens, length, sampling)
        first = jax.device_get(first)
        self._slots[slot] = request
        self._deliver(first, row=0, slot=slot)

    def _step(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._finish(slot, TokenEvent(None, finish_reason="cancelled"))
        if not self.num_active:
            return
        # Decode the smallest row bucket that holds every active slot (requests take the lowest
        # free slot, so at low load that is a small one), attending to the smallest window that
        # holds every active slot's position (prompt + tokens so far).
        active = [(i, r) for i, r in enumerate(self._slots) if r is not None]
        rows = next(size for size in self._row_buckets if size > active[-1][0])
        longest = max(len(r.prompt) + r.completion_tokens for _, r in active)
        window = next(size for size in self._window_buckets if size >= longest)
        self._batch, out = self.program.decode(self.params, self._batch, rows, window)
        self.steps += 1
        out = jax.device_get(out)  # the one host sync per step
        for slot, request in enumerate(self._slots[:rows]):
            if request is not None:
                self._deliver(out, row=slot, slot=slot)

    def _deliver(self, out: Any, row: int, slot: int) -> None:
        """Hands row `row` of a StepOutput to the request in `slot`; ends it if it is done."""
        request = self._slots[slot]
        token = int(out.tokens[row])
        top = ()
        if request.sampling.logprobs:
            top = tuple((int(i), float(p)) for i, p in zip(out.top_ids[row][:request.sampling.logprobs],
                                                            out.top_logprobs[row]))
        finish = None
        if token in request.sampling.stop_ids:
            finish = "stop"
        elif request.completion_tokens + 1 >= request.sampling.max_tokens:
            finish = "length"
        event = TokenEvent(token, float(out.logprobs[row]), top, finish)
        if finish:
            self._finish(slot, event)
        else:
            request._emit(event)

    def _finish(self, slot: int, event: TokenEvent) -> None:
        request, self._slots[slot] = self._slots[slot], None
        self._batch = self.program.release(self._batch, slot)
        request._emit(event)

    def _fail_all(self, message: str) -> None:
        open_requests = {r.id: r for r in [*self._slots, *self._waiting] if r is not None}
        for request in open_requests.values():
            request._emit(TokenEvent(None, finish_reason="error", error=message))
        self._waiting.clear()
        self._slots = [None] * self.max_batch
        self._batch = self.program.empty()  # the failed call may have consumed (donated) it
