"""Tests of runners.py: batching, slots, stopping, sampling, bad inputs, compiles, meshes.

The model is a tiny random Grok (2 layers, 8 experts top-2, int8 weights) saved in the
released checkpoint format and loaded back through the runner, with a SentencePiece
tokenizer trained from data/tiny_corpus.txt (both made by run.py's demo helpers). Sampling
is checked against float64 numpy written from SPEC section 6.
"""

import collections
import contextlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import planner
import run
import runners
from runners import InferenceRunner, InvalidRequestError, ModelRunner, Request

SEQ_LEN = 64
PAD_SIZES = (16, 32)
PROMPTS = [  # three lengths, in two buckets
    "The river",
    "The answer to life the universe and everything is of course",
    "On a clear night far from the lights of a town the sky is crowded with stars",
]
SPEC_PROMPT_IDS = [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]


def tiny_config(**overrides):
    return model.tiny_config(vocab_size=run.TINY_VOCAB, sequence_len=SEQ_LEN, **overrides)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint dir, tokenizer path, params as saved) of the tiny model."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    ckpt, tok = run.build_tiny_demo(directory, tiny_config())
    return ckpt, tok, run.tiny_demo_params(tiny_config())


def make_runner(assets, bs_per_device=2, mesh=(1, 1), config=None, pad_sizes=PAD_SIZES):
    ckpt, tok, _ = assets
    r = InferenceRunner(
        name="test", runner=ModelRunner(model=config or tiny_config(), bs_per_device=bs_per_device,
                                        checkpoint_path=ckpt),
        load=ckpt, tokenizer_path=tok, local_mesh_config=mesh, pad_sizes=pad_sizes)
    r.initialize()
    return r


@contextlib.contextmanager
def backend_compiles():
    """A list that collects jax's backend compilations while the block runs."""
    compiles, listening = [], [True]

    def listener(event, duration, **kwargs):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        listening[0] = False  # jax < 0.7.1 cannot unregister it
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            unregister(listener)


@pytest.fixture(scope="module")
def runner(assets):
    """Two slots on one device: three requests must reuse a slot."""
    return make_runner(assets)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def test_parameters_come_back_from_the_checkpoint(runner, assets):
    saved = assets[2]
    got = runner.params
    # The runner keeps the table as two bf16 tables (model.prepare_for_inference): hi, the
    # table in the compute dtype for the logits, and hi + lo, the float32 rows to 2^-16.
    table = got["language_model/in_out_embed"]["embeddings"]
    want = np.asarray(saved["language_model/in_out_embed"]["embeddings"], np.float32)
    assert isinstance(table, model.SplitTable) and table.hi.dtype == table.lo.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(table.hi.astype(jnp.float32)),
                                  want.astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_allclose(np.asarray(table), want, rtol=2**-16, atol=0)
    q = got["transformer/decoder_layer_1/multi_head_attention/linear"]["w"]
    q_saved = saved["transformer/decoder_layer_1/multi_head_attention/linear"]["w"]
    # ... and the int8 matrices stored transposed, for the kernels (same values).
    assert isinstance(q, model.TransposedWeight8bit) and q.weight.dtype == jnp.int8
    np.testing.assert_array_equal(np.swapaxes(np.asarray(q.weight), -1, -2), np.asarray(q_saved.weight))
    np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)),
                                  np.asarray(q_saved.scales.astype(jnp.float32)))
    assert runner.batch_size == 2 and dict(runner.runner.mesh.shape) == {"data": 1, "model": 1}


# ---------------------------------------------------------------------------------------
# Batching and slots
# ---------------------------------------------------------------------------------------


def test_concurrent_greedy_requests_equal_each_alone(runner):
    prompts_tokens = [runner.tokenize(p) for p in PROMPTS]
    assert len({len(t) for t in prompts_tokens}) == 3 and max(map(len, prompts_tokens)) > 16
    together = runner.generate(PROMPTS, max_len=12, temperature=0.0)  # 3 requests, 2 slots
    alone = [runner.generate([p], max_len=12, temperature=0.0)[0] for p in PROMPTS]
    for t, a in zip(together, alone):
        assert t.tokens == a.tokens and t.text == a.text
        assert len(t.tokens) == 12 and t.finish_reason == "max_len"
    # The outputs depend on the prompt (so mixing slots up could not go unnoticed).
    assert len({tuple(c.tokens) for c in together}) == 3
    assert all(len(set(c.tokens)) > 1 for c in together)


def test_greedy_tokens_and_probabilities_match_a_full_forward_pass(runner):
    """The cache path (bucket prefill, slot insert, decode) against one no-cache forward."""
    config = tiny_config()
    forward = model.make_forward(config)
    done = runner.generate(PROMPTS, max_len=8, temperature=0.0)
    # One batch, right-padded with the pad id (causal: padding never changes earlier positions).
    seqs = np.zeros((len(done), PAD_SIZES[-1] + 8), np.int32)
    for row, c in zip(seqs, done):
        row[:len(c.prompt_tokens) + len(c.tokens)] = c.prompt_tokens + c.tokens
    all_logits = np.asarray(forward(runner.params, jnp.asarray(seqs)).logits, np.float64)
    for c, logits in zip(done, all_logits):
        n = len(c.prompt_tokens)
        for i, token in enumerate(c.tokens):
            row = logits[n - 1 + i].copy()  # predicts generated token i
            row[0] = -np.inf  # the runner never samples the pad id
            # bf16 rounding may swap near-ties only; the chosen token is (nearly) the max.
            assert row[token] >= row.max() - 0.05, (i, row[token], row.max())
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            top_ids = [t for t, _ in c.top_k[i]]
            top_probs = [p for _, p in c.top_k[i]]
            np.testing.assert_allclose(top_probs, probs[top_ids], rtol=0.05, atol=2e-3)
            np.testing.assert_allclose(sorted(top_probs, reverse=True), np.sort(probs)[::-1][:8],
                                       rtol=0.05, atol=2e-3)
            assert c.probs[i] == pytest.approx(probs[token], rel=0.05, abs=2e-3)


def test_sampled_request_does_not_depend_on_its_neighbours(runner):
    req = Request(PROMPTS[1], temperature=1.0, nucleus_p=0.9, rng_seed=7, max_len=10)
    alone = runner.generate([req])[0]
    together = runner.generate([Request(PROMPTS[0], 1.0, 0.9, 1, 10), req, Request(PROMPTS[2], 0.0, 1.0, 2, 5)])
    assert together[1].tokens == alone.tokens


def test_queued_steps_give_every_request_what_the_synchronous_engine_gives(runner):
    """dispatch_admit / dispatch queue steps ahead of collect, as server.py does: every
    request still gets generate()'s tokens, probabilities and text. A request is never
    stepped past its max_len, however many steps were queued: one that ends there gets
    exactly max_len - 1 decode rows; one that draws end-of-sequence may take a few more
    rows (the host learns of the end late; collect drops them), never past max_len. A slot
    takes the next request as soon as its request's last step is dispatched, before that
    step is collected. The slot state and the cache step of a slot's last request agree
    with its rows."""
    config = runner.runner.model
    # Requests that may only draw end-of-sequence or one other token: about half of their
    # steps end them, so some end while steps after theirs are queued.
    eos_or_5 = np.zeros((config.vocab_size,), bool)
    eos_or_5[[config.eos_token, 5]] = True
    requests = [Request(PROMPTS[0], 0.0, 1.0, 1, 3), Request(PROMPTS[1], 1.0, 0.9, 7, 9),
                Request(PROMPTS[2], 0.8, 1.0, 3, 6), Request(PROMPTS[0], 1.0, 1.0, 5, 2)]
    requests += [Request(PROMPTS[1], 1.0, 1.0, seed, 12, eos_or_5) for seed in (1, 2, 3)]
    expected = runner.generate(requests)
    engine, owner, depth = runner.engine(), object(), 4
    waiting = [runner.prepare(r, i) for i, r in enumerate(requests)]
    pending, events, last_in_slot = collections.deque(), collections.defaultdict(list), {}
    decode_rows = collections.Counter()  # request id -> rows of decode steps dispatched for it
    early = 0  # admissions into a slot whose request still had tokens to collect
    while waiting or pending:
        while waiting and engine.free_slots():
            early += engine.slots[engine.free_slots()[0]] is not None
            handle = engine.dispatch_admit(waiting.pop(0), owner)
            (_, slot, rec), = handle.rows
            last_in_slot[slot] = rec.prepared.request_id
            pending.append(handle)
        while len(pending) < depth:
            handle = engine.dispatch()
            if handle is None:
                break
            decode_rows.update(rec.prepared.request_id for _, _, rec in handle.rows)
            pending.append(handle)
        handle = pending.popleft()
        for event in engine.collect(handle):
            events[event.request_id].append(event)
    late = 0  # rows dispatched after a request's end-of-sequence
    for i, want in enumerate(expected):
        got = events[i]
        assert [e.index for e in got] == list(range(len(got)))
        assert got[-1].finished and all(not e.finished for e in got[:-1])
        c = got[-1].completion
        assert c.tokens == want.tokens and c.text == want.text and c.probs == want.probs
        assert c.top_k == want.top_k and c.finish_reason == want.finish_reason
        assert "".join(e.text for e in got) == want.text
        drawn = len(c.tokens) + (c.finish_reason == "eos")  # the end-of-sequence token included
        if c.finish_reason == "max_len":
            assert decode_rows[i] == requests[i].max_len - 1
        else:
            assert drawn - 1 <= decode_rows[i] <= requests[i].max_len - 1
            late += decode_rows[i] - (drawn - 1)
    assert late > 0  # the case of a row that ended in a step not yet collected was met
    assert early > 0  # and that of a slot admitted again before its last step was collected
    assert engine.num_active() == 0 and engine.free_slots() == list(range(len(engine.slots)))
    state, memory = jax.device_get((engine.state, engine.memory))
    for slot, i in last_in_slot.items():
        prompt = len(expected[i].prompt_tokens)
        assert state.count[slot] == 1 + decode_rows[i]
        assert all(layer.step[slot] == prompt + decode_rows[i] for layer in memory.layers)



def test_a_request_being_retired_can_be_cancelled_and_released(runner):
    """A request whose last step is dispatched leaves its slot to the next one at once; it
    can still be cancelled (its last token is dropped, the new request is untouched) and
    released, and another owner still finds the engine busy while it is in flight."""
    engine, owner = runner.engine(), object()
    first, second = Request(PROMPTS[0], 0.0, 1.0, 1, 2), Request(PROMPTS[1], 0.0, 1.0, 2, 4)
    alone = runner.generate([second])[0]
    a = engine.dispatch_admit(runner.prepare(first, "a"), owner)
    (_, slot, _), = a.rows
    step = engine.dispatch()  # the first request's second and last token
    assert slot in engine.free_slots() and engine.num_active(owner) == 1
    b = engine.dispatch_admit(runner.prepare(second, "b"), owner)
    assert b.rows[0][1] == slot and engine.num_active(owner) == 2 and engine.num_busy_slots() == 1
    with pytest.raises(runners.RunnerBusyError):
        engine.dispatch_admit(runner.prepare(second, "x"), object())
    assert engine.cancel("a", owner) and not engine.cancel("a", owner)
    events = engine.collect(a) + engine.collect(step) + engine.collect(b)
    while engine.num_active(owner):
        events += engine.step()
    assert all(e.request_id == "b" for e in events)
    assert events[-1].finished and events[-1].completion.tokens == alone.tokens
    # Released while being retired: nothing of the owner's stays in flight.
    a = engine.dispatch_admit(runner.prepare(first, "a"), owner)
    step = engine.dispatch()
    b = engine.dispatch_admit(runner.prepare(second, "b"), owner)
    engine.release(owner)
    assert engine.num_active() == 0 and engine.collect(a) == engine.collect(step) == engine.collect(b) == []
    assert engine.free_slots() == list(range(len(engine.slots)))


# Grouped admission: 3 requests of bucket 16 (one call of R = 4, a padding row) and 2 of
# bucket 32 (R = 2), greedy and sampled, in 8 slots; slots 5-7 are never admitted.
GROUPED = [Request("The river", 0.0, 1.0, 1, 6), Request(PROMPTS[1], 0.0, 1.0, 2, 6),
           Request("Once upon a time", 1.0, 0.9, 7, 6), Request(PROMPTS[2], 0.8, 1.0, 3, 6),
           Request("She walked along the shore", 1.3, 0.95, 11, 6)]



def test_grouped_prefills_compile_ahead_from_shapes_and_groups_follow_the_limits(assets):
    """grouped_prefills lists the group sizes each bucket allows (at most the batch, 8 and
    sequence_len // bucket), smaller first; compile_prefill builds one from the shapes alone
    (what the server does while serving), after which its first call compiles nothing;
    prefill_groups keeps to the limits it is given (a bucket not in them: one at a time)."""
    r = make_runner(assets, bs_per_device=8)
    config = r.runner.model  # sequence_len 64: bucket 16 takes up to 4, bucket 32 up to 2
    assert runners.grouped_prefills(config, 8, PAD_SIZES) == [(16, 2), (32, 2), (16, 4)]
    assert runners.grouped_prefills(config, 2, PAD_SIZES) == [(16, 2), (32, 2)]
    assert runners.grouped_prefills(config, 1, PAD_SIZES) == []
    engine, owner = r.engine(), object()
    three = [r.prepare(Request(PROMPTS[0], 0.0, 1.0, i, 3), i) for i in range(3)]  # bucket 16
    assert engine.prefill_groups(three) == [[0, 1, 2]]
    assert engine.prefill_groups(three, {16: 2}) == [[0, 1], [2]]
    assert engine.prefill_groups(three, {}) == [[0], [1], [2]]
    times = r.compile_prefill(16, 2)
    assert times["lower_s"] > 0 and times["compile_s"] > 0
    with backend_compiles() as compiles:
        events = engine.collect(engine.dispatch_admit_many(three[:2], owner))
    engine.release(owner)
    assert compiles == [] and [e.request_id for e in events] == [0, 1]

class _GuardLog:
    """Stands in for the engine's Watchdog: records (what, seconds) of every guard."""

    timeout_s = 1.0

    def __init__(self):
        self.guards = []

    def guard(self, what, seconds):
        self.guards.append((what, seconds))
        return contextlib.nullcontext()


@pytest.mark.parametrize("mesh", [(1, 1), (4, 2)])  # (4, 2): rows over data; the model has 2 kv heads
def test_grouped_prefill_gives_each_request_what_one_at_a_time_gives(assets, mesh):
    """dispatch_admit_many prefills several requests of one bucket in one call: each gets
    the tokens (greedy and seeded samples) and probabilities of generate(), which admits one
    request per call; the padding row and the call write no slot but their own (bit for
    bit); the watchdog's program key includes the rows, so a call's first run of a new R
    gets the compilation limit."""
    r = make_runner(assets, bs_per_device=8 // (mesh[0] * mesh[1]), mesh=mesh)
    assert r.batch_size == 8
    fillers = [Request(p, 0.9, 1.0, 20 + i, 3) for i, p in enumerate(PROMPTS)]  # every slot holds data now
    expected = r.generate(GROUPED + fillers)[:len(GROUPED)]
    engine, owner = r.engine(), object()
    prepared = [r.prepare(q, i) for i, q in enumerate(GROUPED)]
    before = jax.device_get((engine.state, engine.memory))
    groups = engine.prefill_groups(prepared)
    assert groups == [[0, 2, 4], [1, 3]]
    log = engine.watchdog = _GuardLog()
    try:
        handles = [engine.dispatch_admit_many([prepared[k] for k in g], owner) for g in groups]
        assert [h.program for h in handles] == [("prefill", 16, 4), ("prefill", 32, 2)]
        assert [[(row, slot) for row, slot, _ in h.rows] for h in handles] == [[(0, 0), (1, 1), (2, 2)],
                                                                                [(0, 3), (1, 4)]]
        after = jax.device_get((engine.state, engine.memory))
        for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
            np.testing.assert_array_equal(a[5:], b[5:])  # unadmitted slots: untouched
        assert list(after[0].count[:5]) == [1] * 5
        events = collections.defaultdict(list)
        for h in handles:
            for e in engine.collect(h):
                events[e.request_id].append(e)
        while engine.num_active(owner):
            for e in engine.step():
                events[e.request_id].append(e)
    finally:
        engine.release(owner)
        engine.watchdog = None
    for i, want in enumerate(expected):
        c = events[i][-1].completion
        assert c.tokens == want.tokens and c.text == want.text and c.finish_reason == want.finish_reason
        # Matmuls of R x bucket rows may round the last float32 bits differently (seen: 4e-5).
        np.testing.assert_allclose(c.probs, want.probs, rtol=1e-3)
    assert len({tuple(c.tokens) for c in expected}) == len(GROUPED)
    # Each new (bucket, rows) program: its dispatch compiles it (10 x the limit), its collect waits.
    factor = runners.FIRST_STEP_TIMEOUT_FACTOR
    assert [g for g in log.guards if g[0].startswith("prefill")] == [
        ("prefill step (bucket 16, 4 rows), compilation included", factor),
        ("prefill step (bucket 32, 2 rows), compilation included", factor),
        ("prefill step (bucket 16, 4 rows)", 1.0), ("prefill step (bucket 32, 2 rows)", 1.0)]
    with pytest.raises(ValueError, match="buckets \\[16, 32\\] differ"):
        engine.dispatch_admit_many(prepared[:2], owner)
    with pytest.raises(ValueError, match="5 requests of bucket 16, more than one call takes \\(4\\)"):
        engine.dispatch_admit_many([prepared[0]] * 5, owner)
    assert engine.num_active() == 0


def test_prefill_rows_are_powers_of_two_within_the_planned_prefill():
    assert [runners.prefill_rows(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="at least one"):
        runners.prefill_rows(0)
    config = tiny_config()  # 64 positions
    limit = runners.prefill_rows_limit
    assert [limit(config, 8, b) for b in (8, 16, 32, 64)] == [8, 4, 2, 1]  # rows x bucket <= 64
    assert [limit(config, b, 4) for b in (1, 2, 3, 6, 32)] == [1, 2, 2, 4, 8]  # the batch; 8 at most


def test_same_seed_same_sample_and_other_seeds_differ(runner):
    a = runner.generate([Request(PROMPTS[2], 1.0, 1.0, 123, 16)])[0]
    b = runner.generate([Request(PROMPTS[2], 1.0, 1.0, 123, 16)])[0]
    c = runner.generate([Request(PROMPTS[2], 1.0, 1.0, 124, 16)])[0]
    assert a.tokens == b.tokens and a.probs == b.probs
    assert a.tokens != c.tokens
    greedy = [runner.generate(PROMPTS[2], max_len=10)[0].tokens for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_stops_at_the_end_of_sequence_token(runner, assets):
    """Make the EOS row of the tied embedding equal token X's: EOS then wins exactly where
    X would (argmax takes the lower id on a tie), so generation must stop there."""
    eos = runner.runner.model.eos_token
    original = runner.params
    free = runner.generate(PROMPTS[0], max_len=12)[0].tokens
    x = free[3]
    stop = free.index(x)
    table = np.asarray(original["language_model/in_out_embed"]["embeddings"]).copy()
    table[eos] = table[x]
    patched = dict(original)
    patched["language_model/in_out_embed"] = {"embeddings": jax.device_put(
        table, original["language_model/in_out_embed"]["embeddings"].sharding)}
    runner.params = patched
    try:
        events = list(runner.stream([Request(PROMPTS[0], 0.0, 1.0, 0, 12)]))
    finally:
        runner.params = original
    last = events[-1]
    assert last.finished and last.finish_reason == "eos" and last.token_id == eos and last.text == ""
    assert [e.finished for e in events] == [False] * stop + [True]
    c = last.completion
    assert c.tokens == free[:stop] and c.finish_reason == "eos"
    assert c.text == runner.tokenizer.decode(free[:stop])


def test_default_mask_excludes_the_pad_id(runner):
    mask = runner.prepare(Request("The river", max_len=4)).mask
    assert not mask[0] and mask[1:].all()  # the tokenizer has all 512 ids
    c = runner.generate([Request(PROMPTS[0], 5.0, 1.0, 11, 40)])[0]  # near uniform sampling
    assert 0 not in c.tokens and len(set(c.tokens)) > 20


def test_token_mask_limits_the_sampled_tokens(runner):
    allowed = [5, 17, 42, 99, 300]
    mask = np.zeros(run.TINY_VOCAB, bool)
    mask[allowed] = True
    for temperature in (0.0, 1.5):
        c = runner.generate([Request(PROMPTS[1], temperature, 1.0, 3, 12, token_mask=mask)])[0]
        assert set(c.tokens) <= set(allowed) and len(c.tokens) == 12
        for top in c.top_k:
            assert {t for t, p in top if p > 0} <= set(allowed)
            assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-5)


def test_streaming_pieces_add_up_to_the_text(runner):
    # Both endings, whatever the platform's random draws: request 0 may only draw the
    # end-of-sequence token, request 1 never; request 2 samples freely.
    eos = runner.runner.model.eos_token
    only_eos, no_eos = np.zeros(run.TINY_VOCAB, bool), np.ones(run.TINY_VOCAB, bool)
    only_eos[eos], no_eos[eos] = True, False
    masks = [only_eos, no_eos, None]
    events = list(runner.stream([Request(p, 0.8, 0.95, 4 + i, 9, token_mask=m)
                                 for i, (p, m) in enumerate(zip(PROMPTS, masks))]))
    for rid in range(3):
        mine = [e for e in events if e.request_id == rid]
        n = len(mine)
        assert [e.index for e in mine] == list(range(n))
        assert [e.finished for e in mine] == [False] * (n - 1) + [True]
        c = mine[-1].completion
        if c.finish_reason == "max_len":
            assert n == 9 and [e.token_id for e in mine] == c.tokens
        else:  # the end-of-sequence token: its event carries no text
            assert c.finish_reason == "eos" and mine[-1].token_id == eos and mine[-1].text == ""
            assert [e.token_id for e in mine[:-1]] == c.tokens
        assert "".join(e.text for e in mine) == c.text == runner.tokenizer.decode(c.tokens)
        assert [e.prob for e in mine[:len(c.tokens)]] == c.probs
        assert all(0 < e.prob <= 1 and len(e.top_k) == 8 for e in mine)
    reasons = [next(e for e in events if e.request_id == rid and e.finished).completion.finish_reason
               for rid in range(2)]
    assert reasons == ["eos", "max_len"]
    # Two slots: the third request starts only when one of the first two has finished.
    first_of_third = next(i for i, e in enumerate(events) if e.request_id == 2)
    assert any(e.finished for e in events[:first_of_third])


def test_run_generator_keeps_the_release_protocol(runner):
    expected = runner.generate(PROMPTS, max_len=6)
    gen = runner.run()
    assert next(gen) is None
    assert gen.send(Request(PROMPTS[0], 0.0, 1.0, 42, 6)) is None  # a slot is still free
    text = gen.send(Request(PROMPTS[1], 0.0, 1.0, 42, 6))  # slots full: decodes
    texts = {text}
    assert isinstance(text, runners.GeneratedText) and isinstance(text, str)
    nxt = next(gen)  # the other request's text, or None (ready)
    while nxt is None or nxt not in texts and len(texts) < 2:
        nxt = gen.send(None) if nxt is None else nxt
        if nxt is not None:
            texts.add(nxt)
            if len(texts) == 2:
                break
    assert texts == {expected[0].text, expected[1].text}
    gen.close()
    gen = runner.run()
    assert runners.sample_from_model(gen, PROMPTS[2], max_len=6, temperature=0.0) == expected[2].text
    assert runners.sample_from_model(gen, PROMPTS[0], max_len=6, temperature=0.0) == expected[0].text
    gen.close()


def test_one_consumer_at_a_time(runner):
    first = runner.stream([Request(p, 0.0, 1.0, 0, 5) for p in PROMPTS[:2]])
    next(first)
    with pytest.raises(RuntimeError, match="in flight"):
        list(runner.stream(Request(PROMPTS[2], 0.0, 1.0, 0, 5)))
    first.close()  # frees its slots
    assert runner._engine.num_active() == 0
    assert len(runner.generate(PROMPTS[2], max_len=3)[0].tokens) == 3


# ---------------------------------------------------------------------------------------
# Bad inputs and cut prompts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_, message", [
    (Request("", 0.0, 1.0, 0, 5), "prompt is empty"),
    (Request("hi", -0.1, 1.0, 0, 5), "temperature=-0.1"),
    (Request("hi", float("nan"), 1.0, 0, 5), "temperature=nan"),
    (Request("hi", 1.0, 0.0, 0, 5), r"nucleus_p \(top_p\)=0.0"),
    (Request("hi", 1.0, 1.5, 0, 5), r"nucleus_p \(top_p\)=1.5"),
    (Request("hi", 1.0, 1.0, 0, 0), "max_len=0"),
    (Request("hi", 1.0, 1.0, 0, 5, token_mask=np.zeros(run.TINY_VOCAB, bool)), "allows no token"),
    (Request("hi", 1.0, 1.0, 0, 5, token_mask=np.ones(7, bool)), r"token_mask has shape \(7,\)"),
])
def test_bad_requests_raise_clear_errors(runner, request_, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        runner.generate([request_])
    assert isinstance(info.value, ValueError)
    assert runner._engine.num_active() == 0


def test_bad_request_in_a_list_fails_before_anything_runs(runner):
    calls = runner._engine.decode.step._cache_size(), runner._engine.num_active()
    with pytest.raises(InvalidRequestError, match="max_len=-1"):
        runner.generate([Request(PROMPTS[0], 0.0, 1.0, 0, 4), Request(PROMPTS[1], 0.0, 1.0, 0, -1)])
    assert (runner._engine.decode.step._cache_size(), runner._engine.num_active()) == calls


def test_prepare_takes_tokens_the_caller_has_already(runner):
    tokens = runner.tokenize(PROMPTS[1])
    assert len(tokens) > 16
    prepared = runner.prepare(Request(PROMPTS[1], max_len=5), 0, tokens=tokens[:3])
    assert prepared.tokens == tokens[:3] and prepared.bucket == PAD_SIZES[0]
    assert runner.prepare(Request(PROMPTS[1], max_len=5), 0).tokens == tokens


def test_long_prompt_is_left_truncated_with_a_warning(runner):
    long_prompt = " ".join(PROMPTS * 3)
    n = len(runner.tokenize(long_prompt))
    assert n > PAD_SIZES[-1]
    with pytest.warns(runners.PromptTruncatedWarning, match=f"has {n} tokens.*dropped its first {n - 32}"):
        c = runner.generate(long_prompt, max_len=4)[0]
    assert c.prompt_tokens == runner.tokenize(long_prompt)[-32:]
    assert len(c.tokens) == 4


def test_prompt_plus_max_len_beyond_the_context_warns_and_cuts(runner):
    n = len(runner.tokenize(PROMPTS[2]))
    with pytest.warns(runners.PromptTruncatedWarning, match=f"max_len cut to {SEQ_LEN - n}"):
        c = runner.generate(PROMPTS[2], max_len=SEQ_LEN)[0]
    assert len(c.tokens) == SEQ_LEN - n and c.finish_reason == "max_len"


def test_no_warning_for_requests_that_fit(runner):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.generate(PROMPTS, max_len=4)


# ---------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------


def test_each_bucket_and_the_decode_step_compile_once(runner):
    runner.generate(PROMPTS, max_len=3)  # both buckets and the decode step are warm now
    with backend_compiles() as compiles:
        runner.generate(PROMPTS, max_len=5, temperature=0.7)
        runner.generate([Request(PROMPTS[0], 0.0, 0.5, 9, 4), Request("Bread and water", 1.3, 1.0, 1, 7)])
        list(runner.stream([Request(p, 0.5, 0.9, 4, 3) for p in PROMPTS[::-1]]))
        runners.sample_from_model(runner.run(), PROMPTS[1], 4, 0.01)
        jax.jit(lambda x: x * 3 + 1)(np.arange(3))  # a probe: the listener does see compiles
    assert len(compiles) == 1  # the probe's, none of the runner's
    assert runner._engine.prefill._cache_size() == len(PAD_SIZES)
    decode = runner._engine.decode
    assert decode.step._cache_size() == decode.take_into._cache_size() == 1
    assert decode._spares  # collect() hands the outputs it read back for the next copies


# ---------------------------------------------------------------------------------------
# Sampling against float64 numpy (SPEC section 6)
# ---------------------------------------------------------------------------------------


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def nucleus_keep64(logits, top_p):
    """Sort ascending; keep logits >= the one at the first index where the cumulative
    probability reaches 1 - top_p. Returns (keep mask, margin of the cumulative sum there)."""
    s = np.sort(logits)
    cum = np.cumsum(softmax64(s))
    idx = int(np.argmax(cum >= 1 - top_p))
    margin = min(abs(cum[idx] - (1 - top_p)), abs(cum[idx - 1] - (1 - top_p)) if idx else 1.0)
    if idx == len(s) - 1 or top_p == 1:
        margin = 1.0  # float32 rounding cannot change these: keep only the largest / keep all
    return logits >= s[idx], margin


def test_top_p_filter_matches_the_release_rule():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    top_p = np.array([1.0, 0.95, 0.8, 0.5, 0.2, 1e-6], np.float32)
    got = np.asarray(runners.top_p_filter(jnp.asarray(logits), jnp.asarray(top_p)))
    for row, p, out in zip(logits, top_p, got):
        keep, margin = nucleus_keep64(row, float(p))
        assert margin > 1e-4  # the case is not on a rounding boundary
        np.testing.assert_array_equal(np.isfinite(out), keep)
        np.testing.assert_array_equal(out[keep], row[keep])
    assert np.isfinite(got[0]).all() and np.isfinite(got[-1]).sum() == 1


def test_samples_follow_the_filtered_distribution():
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0], np.float32)
    mask = np.ones(8, bool)
    mask[7] = False  # the largest logit is not allowed
    temperature, top_p, n = 0.7, 0.9, 20000
    allowed = np.where(mask, logits, -np.inf) / temperature
    keep, margin = nucleus_keep64(allowed, top_p)
    assert margin > 1e-3
    ref = softmax64(np.where(keep, allowed, -np.inf))

    sample = jax.jit(runners.sample_tokens)
    keys = runners.request_keys(jnp.full((n,), 5, jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    draw = sample(jnp.tile(logits, (n, 1)), jnp.tile(mask, (n, 1)), jnp.full((n,), temperature),
                  jnp.full((n,), top_p), keys)
    tokens = np.asarray(draw.token)
    freq = np.bincount(tokens, minlength=8) / n
    assert freq[~keep].sum() == 0  # outside the nucleus or masked: never drawn
    np.testing.assert_array_less(np.abs(freq - ref), 4 * np.sqrt(ref * (1 - ref) / n) + 1e-3)
    np.testing.assert_allclose(np.asarray(draw.prob), ref[tokens], rtol=1e-5)
    order = np.argsort(-ref, kind="stable")[:8]
    np.testing.assert_allclose(np.asarray(draw.top_probs[0]), ref[order], rtol=1e-5, atol=1e-7)
    assert set(np.asarray(draw.top_ids[0])[ref[order] > 0]) == set(order[ref[order] > 0])


def test_temperature_zero_is_argmax_of_the_allowed_tokens():
    logits = jnp.asarray([[0.1, 5.0, 3.0, -1.0], [0.1, 5.0, 3.0, -1.0]], jnp.float32)
    mask = jnp.asarray([[True, True, True, True], [True, False, True, True]])
    keys = runners.request_keys(jnp.zeros((2,), jnp.uint32), jnp.zeros((2,), jnp.int32))
    draw = jax.jit(runners.sample_tokens)(logits, mask, jnp.zeros(2), jnp.full((2,), 0.5), keys)
    assert np.asarray(draw.token).tolist() == [1, 2]
    assert np.all(np.isfinite(np.asarray(draw.prob)))


# ---------------------------------------------------------------------------------------
# Meshes and batch size
# ---------------------------------------------------------------------------------------


def test_auto_mesh_is_the_planners_layout():
    tiny = tiny_config()  # 2 kv heads: the model axis stops at 2, data takes the rest
    assert runners.auto_mesh_config(tiny, 8) == (4, 2)
    assert runners.auto_mesh_config(tiny, 1) == (1, 1)
    odd = tiny_config(emb_size=36)  # width 36: no layout of 8 devices splits it evenly
    assert runners.auto_mesh_config(odd, 8) == planner.choose_mesh(odd, 6) == (3, 2)  # uses 6 of 8
    grok = model.grok_1_config()
    assert runners.auto_mesh_config(grok, 8) == (1, 8)
    assert runners.auto_mesh_config(grok, 16) == (2, 8)
    for n in (1, 2, 4, 8):  # every choice shards the parameters evenly
        data, m = runners.auto_mesh_config(tiny, n)
        model.param_shardings(tiny, runners.make_mesh((data, m)))


def test_model_runner_mesh_errors_and_batch_rounding():
    odd = tiny_config(emb_size=36)
    with pytest.raises(runners.MeshConfigError, match=r"size 36.*\(3, 2\) fits"):
        ModelRunner(model=odd).initialize(local_mesh_config=(1, 8))
    with pytest.raises(ValueError, match=r"model axis \(4\) does not divide num_kv_heads=2"):
        ModelRunner(model=tiny_config()).initialize(local_mesh_config=(2, 4))
    with pytest.raises(runners.MeshConfigError, match="needs 16 devices per host but 8 are present"):
        ModelRunner(model=tiny_config()).initialize(local_mesh_config=(2, 8))
    r = ModelRunner(model=odd, bs_per_device=0.125)
    r.initialize()  # automatic mesh
    assert dict(r.mesh.shape) == {"data": 3, "model": 2}
    assert r.batch_size == 1  # 0.125 * 6 rounds to 0 in the release
    r = ModelRunner(model=tiny_config(), bs_per_device=0.5)
    r.initialize(local_mesh_config=(4, 2))
    assert dict(r.mesh.shape) == {"data": 4, "model": 2} and r.batch_size == 4
    mesh = runners.make_mesh((1, 2), (1, 1))
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 2)
    assert runners.make_mesh().devices.size == jax.local_device_count()


def test_random_parameters_when_no_checkpoint_is_given(assets):
    _, tok, _ = assets
    r = InferenceRunner(name="random", runner=ModelRunner(model=tiny_config(), bs_per_device=1, rng_seed=3),
                        load="", tokenizer_path=tok, local_mesh_config=(1, 1), pad_sizes=PAD_SIZES)
    with pytest.raises(RuntimeError, match="initialize"):
        r.generate("x")
    r.runner.initialize(local_mesh_config=(1, 1))
    params = r.runner.load_or_init()
    expected = model.init_random_params(tiny_config(), 3)
    np.testing.assert_array_equal(np.asarray(params["language_model/rms_norm"]["scale"]),
                                  np.asarray(expected["language_model/rms_norm"]["scale"]))


def test_missing_tokenizer_says_where_to_get_it(tmp_path):
    r = InferenceRunner(name="x", runner=ModelRunner(model=tiny_config()), load="",
                        tokenizer_path=str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="xai-org/grok-1.*--tiny"):
        r.initialize()


@pytest.mark.skipif(not os.environ.get("GROK1_TOKENIZER"), reason="GROK1_TOKENIZER not set")
def test_real_tokenizer_encodes_the_spec_prompt():
    r = InferenceRunner(name="real", runner=ModelRunner(model=model.grok_1_config()), load="",
                        tokenizer_path=os.environ["GROK1_TOKENIZER"])
    assert r.tokenize(run.DEFAULT_PROMPT) == SPEC_PROMPT_IDS
    prepared = r.prepare(Request(run.DEFAULT_PROMPT, 0.01, 1.0, 42, 100))
    assert prepared.tokens == SPEC_PROMPT_IDS and prepared.bucket == 1024 and prepared.max_len == 100


def test_random_weights_on_a_mesh_compiled_ahead_match_the_float64_reference(assets, tmp_path):
    """ModelRunner(random_weights=True): no checkpoint is read, the weights are made on the
    devices with SPEC section 5's layout, compile() builds the very programs the steps then
    run (abstract_step_inputs included), and greedy decoding follows the float64 reference."""
    import reference
    from jax.sharding import PartitionSpec as P

    _, tok, _ = assets
    config = tiny_config(num_layers=1)
    missing = str(tmp_path / "no-checkpoint")  # never read
    r = InferenceRunner(name="random", runner=ModelRunner(model=config, bs_per_device=1, random_weights=True,
                                                          checkpoint_path=missing),
                        load=missing, tokenizer_path=tok, local_mesh_config=(1, 2), pad_sizes=(16,))
    r.initialize()
    assert set(r.timings) == {"setup_s", "weights_s", "engine_s"} and min(r.timings.values()) >= 0
    # SPEC section 5's layout, of the matrices the runner stores transposed ([E, F, D], [N, K]).
    w = r.params["transformer/decoder_layer_0/moe/linear"]["w"]
    assert w.weight.dtype == jnp.int8 and w.weight.sharding.spec == P(None, "model", "data")
    assert len(w.weight.sharding.device_set) == 2
    q = r.params["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    assert q.weight.sharding.spec == P("model", "data")
    # The seed alone fixes the values (the same without a mesh); the int8 are uniform.
    alone = model.init_random_params(config, 42, on_device=True)["transformer/decoder_layer_0/moe/linear"]["w"]
    np.testing.assert_array_equal(np.swapaxes(np.asarray(w.weight), -1, -2), np.asarray(alone.weight))
    counts = np.bincount(np.asarray(w.weight).astype(np.int64).ravel() + 128, minlength=256)
    expected = w.weight.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())  # 255 degrees of freedom: sd 22.6
    assert counts.size == 256 and chi2 < 255 + 6 * 22.6, chi2

    # The abstract inputs (bench.py's compile check) are the engine's, shardings included.
    engine = r._engine
    abstract = runners.abstract_step_inputs(config, r.mesh, r.batch_size)
    real = (engine.params, engine.memory, engine.state)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(real)
    for a, x in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(real)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype)
        assert a.sharding.is_equivalent_to(x.sharding, x.ndim), (a.sharding, x.sharding)

    times = r.compile(grouped=True)  # the 2 slots also take a prefill of 2 requests
    assert set(times) == {"prefill 16", "prefill 16 x2", "decode"}
    assert all(t["lower_s"] > 0 and t["compile_s"] > 0 for t in times.values())
    with backend_compiles() as compiles:
        done = r.generate([PROMPTS[0], "Bread and water"], max_len=6, temperature=0.0)
        owner = object()
        both = [r.prepare(Request(p, 0.0, 1.0, 0, 2), i) for i, p in enumerate([PROMPTS[0], "Bread and water"])]
        first = engine.collect(engine.dispatch_admit_many(both, owner))
        engine.release(owner)
    assert compiles == []  # prefill and decode ran the programs compile() built
    assert [e.token_id for e in first] == [c.tokens[0] for c in done]

    # Every greedy token is the argmax of the float64 reference's logits (bf16 near-ties aside).
    def logical(x):  # the runner's transposed int8 back in the checkpoint's layout
        if model.is_transposed(x):
            return model.QuantizedWeight8bit(np.swapaxes(np.asarray(x.weight), -1, -2), x.scales)
        return x

    params = {m: {n: logical(x) for n, x in v.items()} for m, v in r.params.items()}
    for c in done:
        seq = np.array([c.prompt_tokens + c.tokens], np.int32)
        logits, _ = reference.forward(params, config, seq, bf16=True)
        n = len(c.prompt_tokens)
        assert len(c.tokens) == 6 or c.finish_reason == "eos"
        for i, token in enumerate(c.tokens):
            row = logits[0, n - 1 + i].copy()
            row[config.pad_token] = -np.inf
            assert row[token] >= row.max() - 0.05 * row.std(where=np.isfinite(row)), (i, token, row.argmax())


def _decode_collectives(layers: int, mesh_shape: tuple[int, int]) -> collections.Counter:
    """Collective ops in the compiled decode step of a Grok-shaped tiny model (8 KV heads, so
    every model axis up to 8 divides them, as Grok-1's 8 do) on a data x model CPU mesh."""
    import re

    from jax.sharding import Mesh

    config = model.tiny_config(num_layers=layers, emb_size=256, num_q_heads=16, num_kv_heads=8, key_size=16)
    mesh = Mesh(np.array(jax.devices()[:mesh_shape[0] * mesh_shape[1]]).reshape(mesh_shape), ("data", "model"))
    _, decode = runners.make_step_functions(config, mesh, 8)
    params, memory, state = runners.abstract_step_inputs(config, mesh, 8)
    text = decode.lower(params, memory, state, *runners.step_arguments(config, 8)).compile().as_text()
    kinds = r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast"
    return collections.Counter(m.group(1) for m in re.finditer(rf"= \S+ ({kinds})(?:-start)?\(", text))


@pytest.mark.parametrize("mesh_shape", [(1, 2), (1, 8)])
def test_a_decode_layer_on_a_model_axis_takes_two_all_reduces_and_nothing_else(mesh_shape):
    # Tensor parallelism over the model axis needs one all-reduce after each of a layer's
    # two split-input projections (attention output, MoE down), and no other collective: any
    # resharding of the residual stream inside a layer would show up here on every layer.
    two, three = _decode_collectives(2, mesh_shape), _decode_collectives(3, mesh_shape)
    per_layer = three - two
    assert per_layer == collections.Counter({"all-reduce": 2}) and not two - three, (two, three)
    # Outside the layers: the embedding's gather and the unembedding's partial sums.
    assert two - collections.Counter({"all-reduce": 2 * 2}) == collections.Counter(
        {"all-gather": 1, "all-reduce": 1}), two


def _pointers(tree) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(tree) for s in a.addressable_shards]


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 2)])
def test_the_decode_step_returns_only_buffers_it_was_given(mesh_shape):
    # On a GPU a fresh output lies elsewhere at every call, and XLA updates every command of
    # the step's CUDA graphs that touches it (and the temporaries sharing its allocation)
    # before each launch: the cache (every layer's step too, though only layer 0's is read)
    # and the state, with the step's output in state.last, must be written in place.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    config = model.tiny_config(num_layers=2)
    mesh = Mesh(np.array(jax.devices()[:mesh_shape[0] * mesh_shape[1]]).reshape(mesh_shape), ("data", "model"))
    _, decode = runners.make_step_functions(config, mesh, 4)
    params = model.prepare_for_inference(model.init_random_params(config, 0, mesh, on_device=True), config)
    memory = model.init_memory(config, 4, config.sequence_len, mesh)
    state = jax.device_put(runners._empty_state(4, config.vocab_size), NamedSharding(mesh, P()))
    active = np.array([True, False, True, True])
    # (On the CPU jax may place a numpy array without copying it, and such a buffer cannot
    # be donated: the first call's outputs are the buffers to follow.)
    memory, state, _ = decode(params, memory, state, active)
    given = _pointers((memory, state))
    for _ in range(2):
        memory, state, out = decode(params, memory, state, active.copy())
        assert _pointers((memory, state)) == given
    assert not set(_pointers(out)) & set(given)  # the host's copy is its own
    read = _pointers(out)
    decode.recycle(out)  # read by the host: the next copy goes over it
    memory, state, out = decode(params, memory, state, active)
    assert _pointers(out) == read and _pointers((memory, state)) == given
    np.testing.assert_array_equal(np.asarray(out.draw.token), np.asarray(state.last.draw.token))
    np.testing.assert_array_equal(np.asarray(memory.layers[1].step), [4, 0, 4, 4])
    placed = decode._placed(active.copy(), state)
    assert decode._placed(active.copy(), state) is placed  # `active` is sent once while it stays
    assert decode._placed(~active, state) is not placed
