"""Tests of server.py: the real server (`python run.py serve --tiny`) in a subprocess, spoken
to with the official `openai` client and with plain HTTP.

One server process serves the whole module: the tiny random demo model (2 layers, 8
experts, int8), 8 slots on one CPU device, --max-queue 40. Greedy outputs and their
log-probabilities are checked against the float64 numpy reference (tests/reference.py) of
the same weights; concurrent outputs against the same requests sent alone.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import sentencepiece

import reference
import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS = 8
MAX_QUEUE = 40
CONTEXT = run.TINY_SEQUENCE_LEN
PAD_SIZES = (32, 96)  # --pad-sizes: not the demo's default (32, 128), so the flag must take effect
PROMPT_LIMIT = max(PAD_SIZES)  # the largest prompt bucket (< the context)
PROMPTS = [
    "The river", "Once upon a time", "On a clear night far from the lights of a town the sky is crowded",
    "The answer to life the universe and everything is of course", "A cat", "In the morning the baker",
    "She walked", "Stars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, directory: str, proc: subprocess.Popen, statuses: list[int], log: str):
        self.port, self.directory, self.proc, self.statuses, self.log = port, directory, proc, statuses, log
        self.base = f"http://127.0.0.1:{port}"
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 120):
        """(status, parsed JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, dict):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            data = resp.read().decode()
            if resp.getheader("Content-Type", "").startswith("application/json"):
                return resp.status, json.loads(data)
            return resp.status, data
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("serve"))
    port = free_port()
    env = dict(os.environ)  # one CPU device, as on a user's machine
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["JAX_PLATFORMS"] = "cpu"
    log = os.path.join(directory, "server.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "run.py"), "serve", "--tiny",
             "--tiny-dir", os.path.join(directory, "demo"),
             "--port", str(port), "--slots", str(SLOTS), "--mesh", "1x1", "--max-queue", str(MAX_QUEUE),
             "--pad-sizes", ",".join(map(str, PAD_SIZES)),
             "--log-level", "warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    statuses: list[int] = []
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, open(log).read()[-3000:]
            assert time.monotonic() < deadline, "server not ready after 300 s:\n" + open(log).read()[-3000:]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                statuses.append(status)
                if status == 200:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        yield Server(port, os.path.join(directory, "demo"), proc, statuses, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def token_id(sp, text: str) -> int:
    """The id of a logprobs token text (the server's spelling: spaces for U+2581)."""
    i = sp.piece_to_id(text.replace(" ", "\u2581"))
    assert sp.id_to_piece(i) == text.replace(" ", "\u2581"), text
    return i


# ---------------------------------------------------------------------------------------
# Loading, models, health
# ---------------------------------------------------------------------------------------


def test_text_chunks_are_the_json_of_the_whole_chunk():
    """The stream's text chunks are built from a prefix serialized once per request; they
    must be exactly the JSON of the whole chunk object."""
    import server as server_module

    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": 'gr"ok \u00e9'}
    prefix = server_module._text_chunk_prefix(head)
    for text in ["", " a b", 'caf\u00e9\n"\\ \u2028\x01', "\u65e5\u672c"]:
        for reason in (None, "stop", "length"):
            whole = {**head, "choices": [{"text": text, "index": 3, "logprobs": None, "finish_reason": reason}]}
            assert server_module._text_chunk(prefix, text, 3, reason) == server_module._sse(whole)
            assert json.loads(server_module._text_chunk(prefix, text, 3, reason)[6:]) == whole


class _RecordingLoop:
    """Stands in for the event loop: records what the engine thread hands over."""

    def __init__(self):
        self.handed = []

    def call_soon_threadsafe(self, fn, posts):
        self.handed.append([(delta.index, delta.text, delta.finish_reason, delta.completion_tokens)
                            for _, delta in posts])


def _scheduler(stream_interval: float):
    import types

    import server as server_module

    engine = types.SimpleNamespace(text_context=0, cancel=lambda *args: True)
    runner = types.SimpleNamespace(engine=lambda: engine, tokenizer=None)
    loop = _RecordingLoop()
    scheduler = server_module.Scheduler(runner, server_module.Metrics(2), loop, 10, stream_interval=stream_interval)
    return scheduler, loop


def _events(scheduler, seq, pieces):
    """Feed token events with these texts (the last one ends the request), flushing after each
    as the engine loop does after every step."""
    import runners

    for i, text in enumerate(pieces):
        if seq.done:  # a stop string ended it; the engine sends no more of its tokens
            break
        last = i == len(pieces) - 1
        scheduler._active[seq.rid] = seq
        scheduler._on_event(seq, runners.TokenEvent(seq.rid, i, 100 + i, text, 0.5, (), last,
                                                    "max_len" if last else None))
        scheduler._flush(idle=not scheduler._active)


def test_streamed_tokens_go_out_together_within_the_stream_interval():
    import server as server_module

    pieces = [" The", " river", " runs", " far"]
    scheduler, loop = _scheduler(stream_interval=3600.0)
    seq = server_module._Sequence(0, 1, None, (), None, 0, None, True)
    _events(scheduler, seq, pieces)
    # The first token at once; the next two wait and go out with the end.
    assert loop.handed == [[(1, " The", None, 0)], [(1, " river runs far", "length", 4)]]

    scheduler, loop = _scheduler(stream_interval=0.0)  # every step's tokens at once
    seq = server_module._Sequence(0, 1, None, (), None, 0, None, True)
    _events(scheduler, seq, pieces)
    assert loop.handed == [[(1, " The", None, 0)], [(1, " river", None, 0)], [(1, " runs", None, 0)],
                           [(1, " far", "length", 4)]]

    scheduler, loop = _scheduler(stream_interval=3600.0)  # a plain completion: one delta at its end
    seq = server_module._Sequence(0, 2, None, (" runs",), None, 0, None, False)
    _events(scheduler, seq, pieces)
    assert loop.handed == [[(2, " The river", "stop", 3)]]  # 3 tokens generated, the stop's included


def test_health_is_503_while_loading_then_200(server):
    # Loading and compiling take seconds, so the first answers were "loading".
    assert server.statuses[0] == 503 and server.statuses[-1] == 200
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == SLOTS


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["grok-1-tiny"]
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["max_model_len"] == CONTEXT


# ---------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------


# The model's bf16 logits stand ~2% (relative L2) from float64's, up to ~0.1 in a single
# logit: a probability can move by 10% (seen: 0.0277 against 0.0302 on jax 0.7.0).
PROB_REL = 0.1


def test_greedy_completion_and_logprobs_match_the_float64_reference(server):
    sp = server.tokenizer
    prompt, k = PROMPTS[3], 4
    out = server.client().completions.create(model="grok-1-tiny", prompt=prompt, max_tokens=10, temperature=0,
                                             logprobs=k)
    choice = out.choices[0]
    lp = choice.logprobs
    gen = [token_id(sp, t) for t in lp.tokens]
    prompt_ids = sp.encode(prompt)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(gen) and out.usage.total_tokens == len(prompt_ids) + len(gen)
    assert (len(gen), choice.finish_reason) == (10, "length") or choice.finish_reason == "stop"
    # The text continues the prompt: the whole decode's tail, its joining space included.
    whole, head = sp.decode(prompt_ids + gen), sp.decode(prompt_ids)
    assert choice.text == whole[len(head):] and choice.text.startswith(" ")
    assert lp.text_offset == [len(sp.decode(prompt_ids + gen[:i])) - len(head) for i in range(len(gen))]

    config = run.tiny_demo_config()
    params = run.tiny_demo_params(config)
    logits, _ = reference.forward(params, config, np.array([prompt_ids + gen]), bf16=True)
    allowed = np.arange(config.vocab_size) < sp.vocab_size()
    allowed[config.pad_token] = False
    for i, token in enumerate(gen):
        row = np.where(allowed, logits[0, len(prompt_ids) - 1 + i], -np.inf)
        # bf16 rounding may swap near-ties only: the chosen token is (nearly) the largest.
        assert row[token] >= row.max() - 0.05 * max(1.0, abs(row.max())), (i, row[token], row.max())
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        assert math.exp(lp.token_logprobs[i]) == pytest.approx(probs[token], rel=PROB_REL, abs=3e-3)
        top = lp.top_logprobs[i]
        assert len(top) in (k, k + 1)  # the k most likely, and the sampled token if not among them
        for text, logprob in top.items():
            assert math.exp(logprob) == pytest.approx(probs[token_id(sp, text)], rel=PROB_REL, abs=3e-3)
        # They are the k most likely (up to near-ties).
        assert sorted(math.exp(x) for x in top.values())[-k] >= np.sort(probs)[-k] * 0.95 - 2e-3


def test_streaming_equals_the_plain_answer_and_ends_with_done(server):
    client = server.client()
    kwargs = dict(model="grok-1-tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.object == "text_completion" and c.model == "grok-1-tiny" for c in chunks)
    # The wire format: server-sent events, each `data: {...}`, the last `data: [DONE]`.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(kwargs, stream=True, stream_options={
        "include_usage": True})), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == whole.text
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 12


def test_stop_strings_end_the_text_before_them(server):
    client = server.client()
    kwargs = dict(model="grok-1-tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0]
    assert len(full.text) > 12
    stop = full.text[6:9]  # three characters from the middle of the greedy text
    want = full.text[:full.text.find(stop)]
    for stream in (False, True):
        got = client.completions.create(stop=[stop, "\u2603never"], stream=stream, **kwargs)
        if stream:
            got = list(got)
            text, reason = "".join(c.choices[0].text for c in got), got[-1].choices[0].finish_reason
        else:
            text, reason = got.choices[0].text, got.choices[0].finish_reason
            assert got.usage.completion_tokens < 30
        assert (text, reason) == (want, "stop")
    # A stop string that never shows up changes nothing.
    got = client.completions.create(stop="\u2603", **kwargs).choices[0]
    assert (got.text, got.finish_reason) == (full.text, full.finish_reason)


def test_echo_n_seed_and_prompt_lists(server):
    client = server.client()
    out = client.completions.create(model="grok-1-tiny", prompt=[PROMPTS[0], PROMPTS[4]], max_tokens=6,
                                    temperature=0, echo=True, n=2, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    sp = server.tokenizer
    for c in out.choices:
        prompt = [PROMPTS[0], PROMPTS[4]][c.index // 2]
        assert c.text.startswith(prompt) and len(c.text) > len(prompt)
        n_prompt = len(sp.encode(prompt))  # echoed prompt tokens come first, without logprobs
        assert c.logprobs.token_logprobs[:n_prompt] == [None] * n_prompt
        assert all(x is not None for x in c.logprobs.token_logprobs[n_prompt:])
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices alike
    assert out.choices[0].text != out.choices[2].text
    assert out.usage.prompt_tokens == sum(len(sp.encode(p)) for p in (PROMPTS[0], PROMPTS[4]))
    # Sampling: a seed gives the same choices again; the n choices of one request differ.
    kwargs = dict(model="grok-1-tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=5)
    a = [c.text for c in client.completions.create(**kwargs).choices]
    b = [c.text for c in client.completions.create(**kwargs).choices]
    assert a == b and len(set(a)) == 3


def test_sequences_waiting_together_share_one_prefill_call(server):
    """One request of 3 prompts queues 3 sequences at once: the idle engine prefills them in
    one call (4 rows, one of them padding), and each choice, greedy or seeded, equals its
    prompt sent alone (choice i samples with seed + i)."""
    client = server.client()
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[6]]
    bucket = min(PAD_SIZES)  # short prompts: the smallest bucket holds them
    # The grouped prefills compile after start-up, while the server serves.
    deadline = time.monotonic() + 120
    while (limit := server.metrics().get(f'grok1_prefill_group_limit{{bucket="{bucket}"}}', 0)) < 4:
        assert time.monotonic() < deadline, f"bucket {bucket}: groups of {limit} after 120 s"
        time.sleep(0.1)
    for temperature in (0.0, 1.0):
        kwargs = dict(model="grok-1-tiny", max_tokens=8, temperature=temperature, top_p=0.9)
        before = server.metrics()
        together = [c.text for c in client.completions.create(prompt=prompts, seed=5, **kwargs).choices]
        calls = server.metrics()["grok1_prefill_calls_total"] - before["grok1_prefill_calls_total"]
        assert calls == 1
        alone = [client.completions.create(prompt=p, seed=5 + i, **kwargs).choices[0].text
                 for i, p in enumerate(prompts)]
        assert together == alone and len(set(together)) == 3


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["river"] * (PROMPT_LIMIT + 10))

BAD = [  # (body, HTTP status, param, a phrase of the message)
    (b'{"prompt": "x", ', 400, None, "not valid JSON"),
    (b'["x"]', 400, None, "must be a JSON object"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "Unknown or unsupported field"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": 5}, 400, "prompt", "a string or a list of strings"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "x", "stop": [1]}, 400, "stop", "a string or a list of strings"),
    ({"max_tokens": 5}, 400, "prompt", "is required"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"prompt": ["x", ""]}, 400, "prompt", "prompt 1 of the list"),
    ({"prompt": LONG_PROMPT}, 400, "prompt", f"at most {PROMPT_LIMIT}"),
    ({"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens", f"context of {CONTEXT} tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"prompt": "x", "n": SLOTS + 1}, 400, "n", f"1 .. {SLOTS}"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs", "0 .. 8"),
    ({"prompt": "x", "stop": ""}, 400, "stop", "empty string"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": ["x"] * (MAX_QUEUE + 1)}, 429, None, "--max-queue 40"),
]


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server):
    before = server.metrics()
    for body, status, param, phrase in BAD:
        got, answer = server.request("POST", "/v1/completions", body)
        assert got == status, (body, answer)
        err = answer["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
        assert phrase in err["message"], (phrase, err["message"])
    after = server.metrics()
    assert after['grok1_requests_total{outcome="invalid"}'] - before['grok1_requests_total{outcome="invalid"}'] \
        == sum(s in (400, 404) for _, s, _, _ in BAD)
    assert after['grok1_requests_total{outcome="rejected"}'] - before['grok1_requests_total{outcome="rejected"}'] == 1
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client().completions.create(model="grok-1-tiny", prompt="x", top_p=2.0)
    status, answer = server.request("GET", "/v1/nothing")
    assert status == 404 and "POST /v1/completions" in answer["error"]["message"]
    out = server.client().completions.create(model="grok-1-tiny", prompt="The river", max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_queue_full_answers_429_while_the_slots_are_busy(server):
    """40 long sequences: 8 run, 32 wait; 10 more would pass --max-queue 40."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "prompt": [f"{p} {i}" for i, p in enumerate(PROMPTS * 5)], "max_tokens": CONTEXT - 40,
        "temperature": 1.0, "seed": 3, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first token is out: the 40 sequences are queued
    status, answer = server.request("POST", "/v1/completions", {"prompt": ["x"] * 10, "max_tokens": 1})
    assert status == 429 and answer["error"]["code"] == "queue_full" and "busy" in answer["error"]["message"]
    conn.close()  # the client leaves: its 40 sequences free their slots and leave the queue
    deadline = time.monotonic() + 30
    while (m := server.metrics())["grok1_slots_busy"] or m["grok1_queue_length"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# Disconnects and concurrency
# ---------------------------------------------------------------------------------------


def stream_text(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a greedy streamed completion."""
    chunks = list(client.completions.create(model="grok-1-tiny", prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens


def test_a_client_that_drops_mid_stream_frees_its_slot_and_harms_nobody(server):
    client = server.client()
    alone = stream_text(client, PROMPTS[5], 60)
    before = server.metrics()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(stream_text, server.client(), PROMPTS[5], 60)
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": PROMPTS[6], "max_tokens": 200, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = sock.recv(65536)
        while b"data: " not in received:  # its first token, then hang up
            more = sock.recv(65536)
            assert more, received
            received += more
        sock.close()
        assert other.result() == alone
    deadline = time.monotonic() + 30
    while True:
        m = server.metrics()
        cancelled = m['grok1_requests_total{outcome="cancelled"}'] - before['grok1_requests_total{outcome="cancelled"}']
        if cancelled == 1 and m["grok1_slots_busy"] == 0:
            break
        assert time.monotonic() < deadline, (cancelled, m["grok1_slots_busy"])
        time.sleep(0.1)
    # It stopped early: far fewer than its 200 tokens were generated.
    generated = m["grok1_generated_tokens_total"] - before["grok1_generated_tokens_total"]
    assert generated < alone[2] + 150


def test_32_concurrent_streaming_clients_each_equal_alone(server):
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]}{' and' * (i // len(PROMPTS))}", 4 + (7 * i) % 21) for i in range(32)]
    before = server.metrics()
    barrier = threading.Barrier(len(jobs))

    def one(job):
        client = server.client()
        barrier.wait()
        return stream_text(client, *job)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    after = server.metrics()
    client = server.client()
    alone = [stream_text(client, *job) for job in jobs]
    assert together == alone
    assert all(reason in ("length", "stop") for _, reason, _ in together)
    assert len({text for text, _, _ in together}) > 16  # the outputs differ by prompt
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['grok1_requests_total{outcome="ok"}'] == 32
    assert delta["grok1_generated_tokens_total"] == sum(n for _, _, n in together)
    assert delta["grok1_time_to_first_token_seconds_count"] == 32
    admissions = [delta[f'grok1_slot_admissions_total{{slot="{s}"}}'] for s in range(SLOTS)]
    assert sum(admissions) == 32 and min(admissions) >= 1 and max(admissions) >= 32 / SLOTS  # slots reused
    assert after["grok1_slots_busy"] == 0 and after["grok1_queue_length"] == 0 and after["grok1_slots"] == SLOTS


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def run_serve(args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "serve", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_missing_files_and_a_busy_port(tmp_path, server):
    proc = run_serve([], cwd=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Cannot serve Grok-1" in proc.stderr and "xai-org/grok-1" in proc.stderr
    proc = run_serve(["--tiny", "--port", str(server.port)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(rf"cannot listen on 127\.0\.0\.1:{server.port}", proc.stderr)
    proc = run_serve(["--tiny", "--slots", "0"])
    assert proc.returncode == 2 and "--slots 0" in proc.stderr


def test_serve_hands_the_stream_interval_to_the_server(monkeypatch, capsys):
    import server as server_module

    seen, original = {}, server_module.serve
    monkeypatch.setattr(server_module, "serve", lambda load, host, port, **kw: seen.update(kw))
    assert run.serve_main(["--tiny", "--stream-interval-ms", "7.5"]) == 0
    assert seen["stream_interval"] == pytest.approx(0.0075)
    assert run.serve_main(["--tiny"]) == 0
    assert seen["stream_interval"] == server_module.STREAM_INTERVAL_S
    with pytest.raises(SystemExit) as info:
        run.serve_main(["--tiny", "--stream-interval-ms", "-1"])
    assert info.value.code == 2 and "--stream-interval-ms -1: must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stream_interval=nan"):
        original(lambda: None, stream_interval=float("nan"))
    with pytest.raises(ValueError, match="pipeline_depth=0"):
        original(lambda: None, pipeline_depth=0)


def test_server_state_hands_its_settings_to_the_scheduler(monkeypatch):
    import types

    import server as server_module

    monkeypatch.setattr(server_module.Scheduler, "start", lambda self: None)  # no engine thread here
    engine = types.SimpleNamespace(text_context=0)
    runner = types.SimpleNamespace(engine=lambda: engine, tokenizer=None, batch_size=2, buckets=[32],
                                   runner=types.SimpleNamespace(model=types.SimpleNamespace(sequence_len=64)))
    state = server_module.ServerState("m", 10, stream_interval=0.03, pipeline_depth=4)
    state.attach(runner, _RecordingLoop())
    assert (state.scheduler.depth, state.scheduler.stream_interval, state.scheduler.max_queue) == (4, 0.03, 10)
    assert state.ready.is_set() and state.prompt_limit == 32
