"""An OpenAI-compatible HTTP completions server with continuous batching.

    python run.py serve --tiny                      # a random demo model on any machine
    python run.py serve --checkpoint checkpoints/ckpt-0 --tokenizer checkpoints/tokenizer.model

Endpoints: POST /v1/completions (Grok-1 is a base model: the completions API, streaming
included), GET /v1/models, GET /health (200 once the model is loaded and compiled, 503
before), GET /metrics (Prometheus text format).

How a request flows: the HTTP handler (asyncio, uvicorn) checks the body
(CompletionRequest, then the limits of the model), tokenizes each prompt once
(InferenceRunner.prepare) and queues one _Sequence per choice (prompts x n). One engine
thread owns the device (Scheduler): it dispatches the prefill of waiting sequences into
free slots (those of one pad bucket together, several in one call) and decode steps of
every active slot, keeping PIPELINE_DEPTH steps queued on the device, and turns the oldest
step's tokens into text while the device runs the others (InferenceRunner.engine():
dispatch_admit_many / dispatch / collect). Each token event passes its sequence's
stop-string gate on the engine thread, so a sequence that stops, finishes or is abandoned
by its client frees its slot at once (its rows of the steps already queued are dropped)
and the next waiting sequence is prefilled behind them. The text deltas go to
each request's asyncio side in one loop.call_soon_threadsafe per step.

Shapes and sizes: B slots (the runner's batch), S the context (sequence_len).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import math
import secrets
import threading
import time
import uuid
from typing import Any, Callable, Optional, Union

import prometheus_client
import uvicorn
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import runners

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions API
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_LOGPROBS = runners.TOP_K  # the engine reports the 8 most likely tokens of every step
DEFAULT_MAX_QUEUE = 256
# Steps dispatched and not yet collected when the engine thread collects the oldest: the
# device runs depth - 1 queued steps while the host turns one step's tokens into text and
# hands them on. 1 would wait for every step before dispatching the next.
PIPELINE_DEPTH = 3
# A stream's tokens go to its client at most this often (seconds), several steps' tokens in
# one chunk when steps are shorter; a sequence's first token and its end go out at once.
# Each hand-over costs the event loop a wake-up and every stream a chunk (JSON, HTTP framing,
# a socket write): per step, that host work grows with the batch. At 32 slots (tiny model,
# CPU) 20 ms instead of 5 cut the event loop's CPU per token from 43-44 to 25-27 us; text
# still arrives far faster than anyone reads it (`run.py serve --stream-interval-ms`).
STREAM_INTERVAL_S = 0.02


# ---------------------------------------------------------------------------------------
# Errors: the OpenAI error object
# ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


# ---------------------------------------------------------------------------------------
# The request body
# ---------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: Optional[bool] = None


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields and wrong JSON types are refused (strict);
    null means the default. Ranges are checked by check_ranges()."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Union[str, list[str]]
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    n: Optional[int] = None
    user: Optional[str] = None  # accepted and ignored, as a label of the caller


EXPECTED_TYPES = {
    "prompt": "a string or a list of strings", "model": "a string", "max_tokens": "an integer",
    "temperature": "a number", "top_p": "a number", "seed": "an integer",
    "stop": "a string or a list of strings", "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}', "logprobs": "an integer",
    "echo": "true or false", "n": "an integer", "user": "a string",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "an array" if isinstance(value, list) else "an object"


def parse_body(raw: bytes) -> CompletionRequest:
    """The request body as a CompletionRequest, or a 400 APIError saying what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON ({e}). Send a JSON object such as "
                          '{"prompt": "Hello", "max_tokens": 16}.') from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got {_json_type(data)}.")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"Unknown or unsupported field {field!r}. This server accepts: "
                              f"{', '.join(CompletionRequest.model_fields)}.", field) from None
        if err["type"] == "missing":
            raise bad_request(f"Field {field!r} is required.", field) from None
        if field == "stream_options":
            raise bad_request(f"'stream_options' must be {EXPECTED_TYPES[field]}: {err['msg']}.", field) from None
        value = data.get(field)
        raise bad_request(f"'{field}' must be {EXPECTED_TYPES.get(field, err['msg'])}, got "
                          f"{_json_type(value)}.", field) from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked request, defaults filled in."""

    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: Optional[int]
    echo: bool
    n: int


def check_ranges(req: CompletionRequest, slots: int) -> Settings:
    """Range checks (400 APIError naming the field and the allowed range)."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise bad_request("'prompt' is an empty list: give at least one prompt.", "prompt")
    for i, p in enumerate(prompts):
        if not p:
            where = "" if isinstance(req.prompt, str) else f" (prompt {i} of the list)"
            raise bad_request(f"'prompt' is empty{where}: give at least one token of text.", "prompt")
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens < 1:
        raise bad_request(f"'max_tokens' is {max_tokens}: must be at least 1.", "max_tokens")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise bad_request(f"'temperature' is {temperature!r}: must be a finite number >= 0 (0 is greedy).",
                          "temperature")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not (0 < top_p <= 1):  # NaN fails too
        raise bad_request(f"'top_p' is {top_p!r}: must lie in (0, 1]; 1 keeps every token.", "top_p")
    stops = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' has {len(stops)} strings: at most {MAX_STOP_STRINGS} are allowed.", "stop")
    if any(not s for s in stops):
        raise bad_request("'stop' contains an empty string: every stop string needs at least one character.",
                          "stop")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"'logprobs' is {req.logprobs}: must lie in 0 .. {MAX_LOGPROBS} (the engine reports "
                          f"the {MAX_LOGPROBS} most likely tokens of each step).", "logprobs")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= slots:
        raise bad_request(f"'n' is {n}: must lie in 1 .. {slots}, the number of slots of this server's batch.",
                          "n")
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise bad_request("'stream_options' is only allowed with \"stream\": true.", "stream_options")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Settings(prompts, max_tokens, temperature, top_p, req.seed, stops, stream, include_usage,
                    req.logprobs, bool(req.echo), n)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, slots: int):
        r = self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "grok1_requests", "Completion requests by outcome: ok, invalid (400/404), rejected "
            "(429 queue full), cancelled (client gone), error (500).",
            ["outcome"], registry=r)
        self.prompt_tokens = prometheus_client.Counter(
            "grok1_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generated_tokens = prometheus_client.Counter(
            "grok1_generated_tokens", "Tokens generated (end-of-sequence tokens not counted).", registry=r)
        self.queue_length = prometheus_client.Gauge(
            "grok1_queue_length", "Sequences (one per choice) waiting for a free slot.", registry=r)
        self.slots_busy = prometheus_client.Gauge(
            "grok1_slots_busy", "Slots of the batch holding a sequence.", registry=r)
        self.slots = prometheus_client.Gauge("grok1_slots", "Slots of the batch.", registry=r)
        self.slots.set(slots)
        self.admissions = prometheus_client.Counter(
            "grok1_slot_admissions", "Sequences prefilled into each slot.", ["slot"], registry=r)
        self.prefills = prometheus_client.Counter(
            "grok1_prefill_calls", "Prefill calls; one call admits the waiting sequences of one prompt "
            "bucket together, up to runners.MAX_PREFILL_ROWS.", registry=r)
        self.group_limit = prometheus_client.Gauge(
            "grok1_prefill_group_limit", "Most sequences one prefill call of each prompt bucket takes now: "
            "it grows as the grouped prefills compile after start-up.", ["bucket"], registry=r)
        self.ttft = prometheus_client.Histogram(
            "grok1_time_to_first_token_seconds", "From a sequence's arrival to its first token.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.tpot = prometheus_client.Histogram(
            "grok1_time_per_output_token_seconds", "Per sequence: (last token - first token) / "
            "(tokens - 1), for sequences of two or more tokens.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r)
        for outcome in ("ok", "invalid", "rejected", "cancelled", "error"):
            self.requests.labels(outcome)
        for slot in range(slots):
            self.admissions.labels(str(slot))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


# ---------------------------------------------------------------------------------------
# One choice of a request: a sequence in a slot
# ---------------------------------------------------------------------------------------


class StopGate:
    """Finds the first stop string in the generated text and holds back text that could
    still become one. O(longest stop string + piece) per piece: a stop string that is found
    must start in the held-back text, since everything released was no stop's prefix."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string ended the text: it is cut before it)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        hold = 0
        for s in self.stops:  # the longest end of text that begins some stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.held = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclasses.dataclass
class Delta:
    """What a sequence produced since its last delta (handed to the request's side)."""

    index: int  # the choice index
    text: str = ""
    # (token text, logprob, {token text: logprob} of the most likely, text offset) per token
    logprobs: Optional[list[tuple[str, float, dict, int]]] = None
    finish_reason: Optional[str] = None  # "stop" or "length" on the last delta
    completion_tokens: int = 0  # on the last delta
    error: Optional[str] = None


class _Sequence:
    """One choice: a prepared request, its stop gate and timings. Mutated by the engine
    thread only (except `cancelled`, set under the scheduler's lock)."""

    def __init__(self, rid: int, index: int, prepared: runners._Prepared, stops: tuple[str, ...],
                 logprobs: Optional[int], offset: int, sink: Callable[[Delta], None], stream: bool):
        self.rid, self.index, self.prepared, self.logprobs, self.sink = rid, index, prepared, logprobs, sink
        # Streamed: a delta per flush that has news (None until there is some). Otherwise one
        # delta at the end, built here.
        self.stream = stream
        self.pending: Optional[Delta] = None if stream else Delta(index, logprobs=[] if logprobs is not None else None)
        self.gate = StopGate(stops)
        self.offset = offset  # text offset of the first generated character (the echoed prompt's length)
        self.created = time.monotonic()
        self.first_at: Optional[float] = None
        self.last_at = 0.0
        self.tokens = 0  # generated, end-of-sequence not counted
        self.events = 0  # token events, end-of-sequence included (for the time per output token)
        self.done = False
        self.cancelled = False


class QueueFull(Exception):
    pass


class Scheduler:
    """The engine thread: admits waiting sequences into free slots between decode steps,
    steps the batch and hands each sequence's deltas to its sink on the event loop."""

    def __init__(self, runner: runners.InferenceRunner, metrics: Metrics, loop: asyncio.AbstractEventLoop,
                 max_queue: int, depth: int = PIPELINE_DEPTH, stream_interval: float = STREAM_INTERVAL_S):
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1.")
        self.runner, self.metrics, self.loop, self.max_queue = runner, metrics, loop, max_queue
        self.depth, self.stream_interval = depth, stream_interval
        self.engine = runner.engine()
        self.engine.text_context = 8  # the first piece decodes after the prompt: " word", not "word"
        self.tokenizer = runner.tokenizer
        self.owner = object()  # the engine's one consumer: this scheduler
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cancelled: list[_Sequence] = []
        self._stopping = False
        self._active: dict[int, _Sequence] = {}  # engine thread only
        self._dirty: list[_Sequence] = []  # sequences with a delta to hand on (seq.pending)
        self._errors: list[tuple[Callable[[Delta], None], Delta]] = []
        self._urgent = False  # a first token, an end or an error waits: flush now
        self._flushed_at = 0.0
        self._token_text: dict[int, str] = {}
        self._ids = itertools.count()
        self.thread: Optional[threading.Thread] = None
        # bucket -> the most sequences one prefill call may take: the grouped prefills whose
        # programs are compiled (compile_groups); a bucket not here takes one at a time.
        self.group_rows: dict[int, int] = {}

    def next_id(self) -> int:
        return next(self._ids)

    # ----- called from the event loop -----

    def submit(self, seqs: list[_Sequence]) -> None:
        """Queue the sequences of one request, all or none (QueueFull past max_queue)."""
        with self._cond:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.extend(seqs)
            self.metrics.queue_length.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, seqs: list[_Sequence]) -> None:
        """Drop sequences whose client is gone: waiting ones leave the queue, running ones
        free their slot before the next step."""
        with self._cond:
            for seq in seqs:
                if seq.done or seq.cancelled:
                    continue
                seq.cancelled = True
                try:
                    self._waiting.remove(seq)
                except ValueError:
                    self._cancelled.append(seq)
            self.metrics.queue_length.set(len(self._waiting))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # ----- the engine thread -----

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="grok1-engine", daemon=True)
        self.thread.start()
        threading.Thread(target=self.compile_groups, name="grok1-compile", daemon=True).start()

    def compile_groups(self) -> None:
        """Compile the prefills of several sequences at once (2, 4, ... per call) while
        serving, smaller groups first; each bucket's admissions group up to the largest
        size compiled so far. So the server is ready once the one-sequence programs are,
        and never stalls the running sequences to compile a group size at its first use."""
        config, start = self.runner.runner.model, time.perf_counter()
        programs = runners.grouped_prefills(config, self.runner.batch_size, self.runner.buckets)
        for bucket in self.runner.buckets:
            self.metrics.group_limit.labels(str(bucket)).set(1)
        for bucket, rows in programs:
            with self._cond:
                if self._stopping:
                    return
            try:
                times = self.runner.compile_prefill(bucket, rows)
                logger.info("Compiled prefill %d x%d while serving (%.1f s).", bucket, rows,
                            times["lower_s"] + times["compile_s"])
            except Exception:  # noqa: BLE001 - serving goes on with the groups compiled so far
                logger.exception("Compiling the prefill of %d sequences of bucket %d failed; "
                                 "admissions stay in smaller groups.", rows, bucket)
                return
            self.group_rows[bucket] = rows
            self.metrics.group_limit.labels(str(bucket)).set(rows)
        if programs:
            logger.info("Grouped prefills compiled (%s) in %.1f s.", ", ".join(
                f"bucket {b}: up to {r}" for b, r in sorted(self.group_rows.items())), time.perf_counter() - start)

    def run(self) -> None:
        """The loop. Steps are queued ahead: before it collects step t's tokens, steps up to
        t + depth - 1 are dispatched (prefills of new sequences included), so the device
        never waits for the host's work on a step. A sequence is not stepped past its
        max_tokens, and its slot takes the next waiting sequence as soon as its last step
        is dispatched (engine.free_slots). One that ends otherwise at step t (end of
        sequence, a stop string, a cancel) has its rows of the later steps dropped by
        engine.collect."""
        pending: collections.deque[runners.StepHandle] = collections.deque()  # dispatched, not collected
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._cancelled or self._active or pending):
                    self._cond.wait()
                if self._stopping:
                    return
                cancelled, self._cancelled = self._cancelled, []
            for seq in cancelled:
                if self._active.pop(seq.rid, None) is not None:
                    self.engine.cancel(seq.rid, self.owner)
                    seq.done = True
            try:
                self._admit(pending)
                while len(pending) < self.depth:
                    handle = self.engine.dispatch()
                    if handle is None:
                        break
                    pending.append(handle)
                events = self.engine.collect(pending.popleft()) if pending else []
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                logger.exception("A step failed; ending the %d running sequences.", len(self._active))
                self._fail_all(e)
                pending.clear()
                events = []
            new_tokens = sum(self._on_event(self._active[e.request_id], e) for e in events)
            self.metrics.generated_tokens.inc(new_tokens)
            self.metrics.slots_busy.set(self.engine.num_busy_slots())
            self._flush(idle=not (pending or self._active))

    def _admit(self, pending: collections.deque) -> None:
        """Dispatch the prefill of the waiting sequences that fit the free slots, those of one
        bucket together in as few calls as the engine allows (engine.prefill_groups), in
        arrival order within a bucket (their first tokens come with the handles)."""
        free = len(self.engine.free_slots())
        if not free:
            return
        with self._cond:
            seqs = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self.metrics.queue_length.set(len(self._waiting))
        if not seqs:
            return
        for group in self.engine.prefill_groups([seq.prepared for seq in seqs], self.group_rows):
            batch = [seqs[i] for i in group]
            try:
                handle = self.engine.dispatch_admit_many([seq.prepared for seq in batch], self.owner)
            except Exception as e:  # noqa: BLE001
                logger.exception("Prefill failed.")
                for seq in batch:
                    self.engine.cancel(seq.rid, self.owner)
                    self._finish_with_error(seq, e)
                continue
            pending.append(handle)
            self.metrics.prefills.inc()
            for (_, slot, _), seq in zip(handle.rows, batch):
                self.metrics.admissions.labels(str(slot)).inc()
                self._active[seq.rid] = seq
        self.metrics.slots_busy.set(self.engine.num_busy_slots())

    def _on_event(self, seq: _Sequence, event: runners.TokenEvent) -> int:
        """Pass one token event through the sequence's gate; returns 1 if it is a generated
        token (0 for the end-of-sequence token)."""
        now = time.monotonic()
        if seq.first_at is None:
            seq.first_at = now
            self.metrics.ttft.observe(now - seq.created)
        seq.last_at = now
        seq.events += 1
        eos = event.finished and event.finish_reason == "eos"
        entries = None
        if not eos:
            seq.tokens += 1
            if seq.logprobs is not None:
                entries = [self._logprob_entry(seq, event)]
        seq.offset += len(event.text)
        text, stopped = seq.gate.feed(event.text)
        finish = None
        if stopped:
            finish = "stop"
            if not event.finished:
                self.engine.cancel(seq.rid, self.owner)  # the slot is free for the next admission
        elif event.finished:
            text += seq.gate.flush()
            finish = "stop" if eos else "length"
        if finish:
            self._active.pop(seq.rid, None)
            seq.done = True
            if seq.events > 1:
                self.metrics.tpot.observe((seq.last_at - seq.first_at) / (seq.events - 1))
        # One delta per sequence and flush: a streamed sequence's news since the last flush,
        # or a whole completion (sent when it ends).
        if seq.stream:
            if text or entries or finish:
                delta = seq.pending
                if delta is None:
                    delta = seq.pending = Delta(seq.index, logprobs=[] if seq.logprobs is not None else None)
                    self._dirty.append(seq)
                delta.text += text
                if entries:
                    delta.logprobs.extend(entries)
                if finish or seq.events == 1:
                    self._urgent = True  # the first token and the end go out at once
        else:
            seq.pending.text += text
            if entries:
                seq.pending.logprobs.extend(entries)
            if finish:
                self._dirty.append(seq)
                self._urgent = True
        if finish:
            seq.pending.finish_reason, seq.pending.completion_tokens = finish, seq.tokens
        return 0 if eos else 1

    def _logprob_entry(self, seq: _Sequence, event: runners.TokenEvent) -> tuple[str, float, dict, int]:
        top: dict[str, float] = {}
        for token_id, prob in event.top_k[:seq.logprobs]:
            if prob > 0:  # tokens the top-p filter removed have no finite logprob
                top.setdefault(self.token_text(token_id), math.log(prob))
        text = self.token_text(event.token_id)
        logprob = math.log(event.prob) if event.prob > 0 else -9999.0
        top.setdefault(text, logprob)  # always the sampled token too, as OpenAI's API
        return text, logprob, top, seq.offset

    def token_text(self, token_id: int) -> str:
        """A token as text for logprobs: its piece with spaces, or "bytes:\\xNN" for a byte."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.tokenizer
            if hasattr(tok, "is_byte") and tok.is_byte(token_id):
                text = "bytes:\\x" + tok.id_to_piece(token_id)[3:5].lower()  # "<0xE6>" -> "bytes:\xe6"
            elif hasattr(tok, "id_to_piece"):
                text = tok.id_to_piece(token_id).replace("\u2581", " ")
            else:
                text = tok.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _finish_with_error(self, seq: _Sequence, error: Exception) -> None:
        seq.done = True
        self._errors.append((seq.sink, Delta(seq.index, error=f"{type(error).__name__}: {error}")))
        self._urgent = True

    def _fail_all(self, error: Exception) -> None:
        self.engine.release(self.owner)
        for seq in self._active.values():
            self._finish_with_error(seq, error)
        self._active.clear()

    def _flush(self, idle: bool = False) -> None:
        """Hand the sequences' deltas to the event loop: at once for a first token, an end or
        an error, or when the engine goes idle; else at most every stream_interval seconds
        (the tokens of the steps between go out together, one chunk per stream)."""
        if not (self._dirty or self._errors):
            return
        now = time.monotonic()
        if not (idle or self._urgent or now - self._flushed_at >= self.stream_interval):
            return
        posts = [(seq.sink, seq.pending) for seq in self._dirty] + self._errors
        for seq in self._dirty:
            if seq.stream:
                seq.pending = None
        self._dirty, self._errors, self._urgent, self._flushed_at = [], [], False, now
        try:
            self.loop.call_soon_threadsafe(_deliver, posts)
        except RuntimeError:  # the loop has closed: shutting down
            pass


def _deliver(posts: list[tuple[Callable[[Delta], None], Delta]]) -> None:
    for sink, delta in posts:
        sink(delta)


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    """A choice's result as it accumulates on the event loop."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[tuple[str, float, dict, int]] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    completion_tokens: int = 0


class ServerState:
    """What the handlers share: the runner and scheduler (once loaded), metrics, limits."""

    def __init__(self, model_name: str, max_queue: int, stream_interval: float = STREAM_INTERVAL_S,
                 pipeline_depth: int = PIPELINE_DEPTH):
        self.model_name = model_name
        self.max_queue = max_queue
        self.stream_interval = stream_interval
        self.pipeline_depth = pipeline_depth
        self.created = int(time.time())
        self.ready = threading.Event()
        self.runner: Optional[runners.InferenceRunner] = None
        self.scheduler: Optional[Scheduler] = None
        self.metrics: Optional[Metrics] = None
        self.load_error: Optional[BaseException] = None

    def attach(self, runner: runners.InferenceRunner, loop: asyncio.AbstractEventLoop) -> None:
        """Called once the runner is initialized and warmed up: start serving."""
        self.runner = runner
        self.metrics = Metrics(runner.batch_size)
        self.scheduler = Scheduler(runner, self.metrics, loop, self.max_queue, depth=self.pipeline_depth,
                                   stream_interval=self.stream_interval)
        config = runner.runner.model
        self.context = config.sequence_len
        self.prompt_limit = min(runner.buckets[-1], config.sequence_len - 1)
        self.scheduler.start()
        self.ready.set()


def warm_up(runner: runners.InferenceRunner) -> None:
    """Compile the decode step and each bucket's one-sequence prefill before the first
    request, so that no client waits for a compilation (and time to first token measures
    serving); the grouped prefills follow while serving (Scheduler.compile_groups). With the
    persistent compilation cache a restart reads them."""
    runner.compile()


def _openai_logprobs(entries: list[tuple[str, float, dict, int]], prompt: Optional[list[tuple[str, int]]]) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for text, offset in prompt or ():  # the echoed prompt: no logprobs are computed for it
        tokens.append(text), lps.append(None), tops.append(None), offsets.append(offset)
    for text, lp, top, offset in entries:
        tokens.append(text), lps.append(lp), tops.append(top), offsets.append(offset)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _text_chunk_prefix(head: dict) -> str:
    """The start of every text chunk of a stream without logprobs: _sse({**head, "choices":
    [{"text": ...}]}) up to the text, serialized once per request instead of per token."""
    return "data: " + json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"choices":[{"text":'


def _text_chunk(prefix: str, text: str, index: int, finish_reason: Optional[str]) -> str:
    """_sse({**head, "choices": [{"text": text, "index": index, "logprobs": None,
    "finish_reason": finish_reason}]}), built on _text_chunk_prefix(head)."""
    reason = "null" if finish_reason is None else json.dumps(finish_reason)
    return (f'{prefix}{json.dumps(text, ensure_ascii=False)},"index":{index},"logprobs":null,'
            f'"finish_reason":{reason}}}]}}\n\n')


async def _wait_disconnect(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(state: ServerState) -> Starlette:
    """The Starlette application over `state` (which attach() fills once loaded)."""

    def outcome(name: str) -> None:
        if state.metrics is not None:
            state.metrics.requests.labels(name).inc()

    async def health(request: HTTPRequest) -> Response:
        if state.ready.is_set():
            return JSONResponse({"status": "ok", "model": state.model_name,
                                 "slots": state.runner.batch_size})
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(request: HTTPRequest) -> Response:
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "grok-1"}
        if state.ready.is_set():
            entry["max_model_len"] = state.context
        return JSONResponse({"object": "list", "data": [entry]})

    async def metrics(request: HTTPRequest) -> Response:
        if state.metrics is None:
            return APIError(503, "The model is still loading; metrics start once it is ready.",
                            type="service_unavailable").response()
        return Response(state.metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def completions(request: HTTPRequest) -> Response:
        if not state.ready.is_set():
            return APIError(503, "The model is still loading; try again when GET /health answers 200.",
                            type="service_unavailable").response()
        try:
            settings, seqs, prompt_tokens, sinks = await prepare_request(request)
        except APIError as e:
            outcome("rejected" if e.status == 429 else "invalid")
            return e.response()
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if settings.stream:
            return StreamingResponse(stream(settings, seqs, prompt_tokens, sinks, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, settings, seqs, prompt_tokens, sinks, rid, created)

    async def prepare_request(request: HTTPRequest):
        req = parse_body(await request.body())
        if req.model is not None and req.model != state.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist here; this server serves "
                                f"{state.model_name!r} (see GET /v1/models).", "model", code="model_not_found")
        runner, scheduler = state.runner, state.scheduler
        settings = check_ranges(req, runner.batch_size)
        seqs: list[_Sequence] = []
        prompt_tokens: list[list[int]] = []
        queue: asyncio.Queue = asyncio.Queue()
        for i, prompt in enumerate(settings.prompts):
            tokens = runner.tokenize(prompt)
            where = "" if len(settings.prompts) == 1 else f" {i}"
            if not tokens:
                raise bad_request(f"'prompt'{where} encodes to no tokens.", "prompt")
            if len(tokens) > state.prompt_limit:
                raise bad_request(
                    f"'prompt'{where} has {len(tokens)} tokens; this server takes at most {state.prompt_limit} "
                    f"(context {state.context} tokens, largest prompt bucket {runner.buckets[-1]}).", "prompt")
            if len(tokens) + settings.max_tokens > state.context:
                raise bad_request(
                    f"'prompt'{where} ({len(tokens)} tokens) + 'max_tokens' ({settings.max_tokens}) exceeds the "
                    f"context of {state.context} tokens; ask for at most {state.context - len(tokens)} tokens.",
                    "max_tokens")
            request = runners.Request(prompt=prompt, temperature=settings.temperature, nucleus_p=settings.top_p,
                                      rng_seed=0, max_len=settings.max_tokens)
            try:
                prepared = runner.prepare(request, None, tokens=tokens)
            except runners.InvalidRequestError as e:
                raise bad_request(str(e)) from None
            prompt_tokens.append(prepared.tokens)
            for j in range(settings.n):
                index = i * settings.n + j
                seed = (settings.seed + index if settings.seed is not None else secrets.randbits(31))
                rid = scheduler.next_id()
                seqs.append(_Sequence(
                    rid, index, dataclasses.replace(prepared, request_id=rid,
                                                    request=dataclasses.replace(request, rng_seed=seed)),
                    settings.stops, settings.logprobs, len(prompt) if settings.echo else 0, queue.put_nowait,
                    settings.stream))
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e.args[0]} sequences are waiting for a slot and this "
                                f"request adds {len(seqs)} (limit --max-queue {state.max_queue}). Retry later.",
                           type="rate_limit_error", code="queue_full") from None
        state.metrics.prompt_tokens.inc(sum(len(t) for t in prompt_tokens))
        return settings, seqs, prompt_tokens, queue

    def echo_entries(tokens: list[int]) -> list[tuple[str, int]]:
        stream_ = runners._TextStream(state.runner.tokenizer)
        out, offset = [], 0
        for t in tokens:
            out.append((state.scheduler.token_text(t), offset))
            offset += len(stream_.push(t))
        return out

    def usage(prompt_tokens: list[list[int]], choices: dict[int, Choice]) -> dict:
        p = sum(len(t) for t in prompt_tokens)
        c = sum(ch.completion_tokens for ch in choices.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(settings: Settings, seqs, prompt_tokens, queue: asyncio.Queue, rid: str, created: int):
        head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
        prefix = _text_chunk_prefix(head)
        choices = {seq.index: Choice() for seq in seqs}
        finished = False
        try:
            if settings.echo:
                for seq in seqs:
                    i = seq.index // settings.n
                    lp = (_openai_logprobs([], echo_entries(prompt_tokens[i]))
                          if settings.logprobs is not None else None)
                    yield _sse({**head, "choices": [{"text": settings.prompts[i], "index": seq.index,
                                                     "logprobs": lp, "finish_reason": None}]})
            left = len(seqs)
            while left:
                deltas = [await queue.get()]
                while not queue.empty():
                    deltas.append(queue.get_nowait())
                merged: dict[int, Delta] = {}
                for d in deltas:
                    if d.error is not None:
                        raise RuntimeError(d.error)
                    m = merged.setdefault(d.index, Delta(d.index, logprobs=[] if d.logprobs is not None else None))
                    m.text += d.text
                    if d.logprobs:
                        m.logprobs = (m.logprobs or []) + d.logprobs
                    if d.finish_reason:
                        m.finish_reason, m.completion_tokens = d.finish_reason, d.completion_tokens
                        choices[d.index].completion_tokens = d.completion_tokens
                        left -= 1
                out = []
                for m in merged.values():
                    if settings.logprobs is None:
                        out.append(_text_chunk(prefix, m.text, m.index, m.finish_reason))
                        continue
                    lp = _openai_logprobs(m.logprobs, None)
                    out.append(_sse({**head, "choices": [{"text": m.text, "index": m.index, "logprobs": lp,
                                                          "finish_reason": m.finish_reason}]}))
                yield "".join(out)
            if settings.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(prompt_tokens, choices)})
            yield "data: [DONE]\n\n"
            finished = True
            outcome("ok")
        except RuntimeError as e:  # the engine failed these sequences
            outcome("error")
            finished = True
            yield _sse(APIError(500, f"Generation failed: {e}", type="server_error").body())
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                outcome("cancelled")
                state.scheduler.cancel(seqs)

    async def collect(request: HTTPRequest, settings: Settings, seqs, prompt_tokens, queue: asyncio.Queue,
                      rid: str, created: int) -> Response:
        choices = {seq.index: Choice() for seq in seqs}
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            left = len(seqs)
            while left:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    state.scheduler.cancel(seqs)
                    outcome("cancelled")
                    return Response(status_code=499)  # nobody reads it
                deltas = [get.result()]
                while not queue.empty():
                    deltas.append(queue.get_nowait())
                for d in deltas:
                    if d.error is not None:
                        state.scheduler.cancel(seqs)
                        outcome("error")
                        return APIError(500, f"Generation failed: {d.error}", type="server_error").response()
                    c = choices[d.index]
                    c.text.append(d.text)
                    if d.logprobs:
                        c.logprobs.extend(d.logprobs)
                    if d.finish_reason:
                        c.finish_reason, c.completion_tokens = d.finish_reason, d.completion_tokens
                        left -= 1
        finally:
            gone.cancel()
        out = []
        for index in sorted(choices):
            c, i = choices[index], index // settings.n
            lp = None
            if settings.logprobs is not None:
                lp = _openai_logprobs(c.logprobs, echo_entries(prompt_tokens[i]) if settings.echo else None)
            out.append({"text": (settings.prompts[i] if settings.echo else "") + "".join(c.text), "index": index,
                        "logprobs": lp, "finish_reason": c.finish_reason})
        outcome("ok")
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                             "choices": out, "usage": usage(prompt_tokens, choices)})

    async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}. This server has "
                                         "POST /v1/completions, GET /v1/models, GET /health and GET /metrics.",
                        type=kind).response()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------


def serve(load: Callable[[], runners.InferenceRunner], host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "grok-1", max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info",
          on_ready: Optional[Callable[[runners.InferenceRunner], None]] = None,
          stream_interval: float = STREAM_INTERVAL_S, pipeline_depth: int = PIPELINE_DEPTH) -> None:
    """Listen on host:port at once (GET /health answers 503 while loading), call load() on
    the engine thread, compile every program (warm_up), then serve until interrupted.

    load() returns an InferenceRunner that has been initialized; nothing else may use it
    afterwards. on_ready(runner), if given, runs after the warm-up, before the first request
    (bench.py measures the engine there). An exception from load() stops the server and is
    raised here. stream_interval: seconds between a stream's chunks at most; pipeline_depth:
    steps dispatched ahead of the one collected (Scheduler).
    """
    if max_queue < 0:
        raise ValueError(f"max_queue={max_queue}: must be >= 0.")
    if not stream_interval >= 0:
        raise ValueError(f"stream_interval={stream_interval}: must be >= 0 seconds.")
    if pipeline_depth < 1:
        raise ValueError(f"pipeline_depth={pipeline_depth}: must be >= 1.")
    state = ServerState(model_name, max_queue, stream_interval, pipeline_depth)
    app = build_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))

    def loading(loop: asyncio.AbstractEventLoop) -> None:
        try:
            start = time.perf_counter()
            runner = load()
            warm_up(runner)
            if on_ready is not None:
                on_ready(runner)
            state.attach(runner, loop)
            logger.info("Ready: %s with %d slot(s), context %d, prompts up to %d tokens (%.1f s to load and "
                        "compile).", model_name, runner.batch_size, state.context, state.prompt_limit,
                        time.perf_counter() - start)
        except BaseException as e:  # noqa: BLE001 - reported by serve()
            state.load_error = e
            server.should_exit = True

    async def main() -> None:
        threading.Thread(target=loading, args=(asyncio.get_running_loop(),), name="grok1-load",
                         daemon=True).start()
        await server.serve()

    try:
        asyncio.run(main())
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
    if state.load_error is not None:
        raise state.load_error
