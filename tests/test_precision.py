"""bf16 precision of the whole model against the float64 reference, on issue 12's recipes.

Two random models built by tests/precision.py from the issue's recipe ("2 layers", "12
layers"; weights drawn here, not read from any release file), both MoE modes, on CPU. The
metric: p90 over valid positions of the per-position relative L2 error of the logits vs
tests/reference.py in float64, for prefill and for teacher-forced decode through the bf16
KV cache; and greedy generation through the runner's run() against the float64 rollout.

Routing flips (a near-tie between the 2nd and 3rd expert resolved the other way after a
rounding) change a position's logits by 5-40% and, through attention, the positions after
it (SPEC's testing note). At 12 layers they decide the p90 (measured over seeds 0-4:
3.5e-3 to 0.107 in both modes, the same flips that rounding only the bf16 KV cache makes
in float64). So the bounds below
apply to the error against float64 run with the model's own expert choices (the
arithmetic's error); issue 12's targets, on the plain metric, are checked as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import runners
from tests import precision as pr
from tests import reference

IMPLS = ("fast", "reference")
CASES = [(name, impl) for name in pr.RECIPES for impl in IMPLS]
# Issue 12's targets for the plain p90 (float64 with its own routing).
ISSUE_TARGET = {"2 layers": 1.2e-2, "12 layers": 1.0e-2}
# Bounds on the p90 against float64 with the model's routing, prefill and decode. Measured
# on CPU, jax 0.10.2, seed 0 (prefill; decode within 1%), with float32 activations (only
# the KV cache rounded): 2 layers fast 9.13e-3, reference 9.00e-3; 12 layers fast 4.08e-3,
# reference 4.04e-3. With bf16 matmul inputs, q and attention (the previous model): 1.90e-2,
# 2.39e-2, 1.05e-2, 1.37e-2.
BOUND = {("2 layers", "fast"): 1.2e-2, ("2 layers", "reference"): 1.2e-2,
         ("12 layers", "fast"): 6e-3, ("12 layers", "reference"): 6e-3}
# Where the plain metric misses the issue's target on seed 0: 12 layers, both modes, 0.107
# prefill and decode, from 3 routing flips. That is the bf16 KV cache's doing: in
# tests/reference.py's emulation (float64 arithmetic, float64's own routing decisions),
# rounding only what the cache stores gives the same 0.107 on this seed, with the same
# flips (2.7e-2, 3.5e-3, 7.0e-2, 4.0e-3 on seeds 1-4; BENCHMARKS.md, "Precision").
UNMET = {("12 layers", "fast"), ("12 layers", "reference")}
NEAR_TIE = 0.01  # top-2 logit gap below which greedy decoding may legitimately differ
PROMPT_SEED, PROMPT_LEN, NEW_TOKENS = 100, 8, 10  # float64 rollouts: first near-tie at step 7 / none


@functools.lru_cache(maxsize=None)
def recipe(name: str) -> pr.Recipe:
    return pr.make_recipe(name, seed=0)


@functools.lru_cache(maxsize=None)
def device_params(name: str) -> dict:
    return pr.to_device(recipe(name).params)


@functools.lru_cache(maxsize=None)
def measured(name: str, impl: str) -> dict:
    return pr.measure(recipe(name), impl, device_params(name))


@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("name,impl", CASES)
def test_logits_p90_with_the_models_routing(name, impl, kind):
    err = measured(name, impl)[kind]["p90_same_routing"]
    assert err <= BOUND[name, impl], (
        f"{name}, {impl} MoE, {kind}: p90 relative error {err:.3g} > {BOUND[name, impl]} "
        "(vs float64 with the same expert choices)")


@pytest.mark.parametrize("name,impl", [
    pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason="issue 12 target not met; see UNMET"))
    if case in UNMET else case for case in CASES])
def test_issue_12_targets(name, impl):
    """The plain metric against the issue's targets, prefill and decode. Strict xfail where
    not met: an XPASS fails, to say that UNMET is out of date."""
    m = measured(name, impl)
    worst = max(m["prefill"]["p90"], m["decode"]["p90"])
    assert worst <= ISSUE_TARGET[name], f"{name}, {impl} MoE: p90 {worst:.3g} > {ISSUE_TARGET[name]}"


class IdTokenizer:
    """Token ids written as decimal numbers: "5 17 300" <-> [5, 17, 300]. pad 0, eos 2."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [int(p) for p in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def vocab_size(self) -> int:
        return self.vocab

    def pad_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return 2


def prompt_tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(PROMPT_SEED).integers(3, vocab, PROMPT_LEN)


@functools.lru_cache(maxsize=None)
def reference_rollout(name: str) -> tuple[list[int], list[float]]:
    """Float64 greedy continuation of the test prompt: (tokens, top-2 logit gaps).

    Token 0 (pad) is never chosen, as in the runner; it stops after the end-of-sequence id.
    """
    cfg = pr.recipe_config(name)
    exact = recipe(name).exact
    cache = reference.init_cache(cfg, 1, PROMPT_LEN + NEW_TOKENS)
    logits, cache = reference.forward(exact, cfg, prompt_tokens(cfg.vocab_size)[None], cache)
    out, gaps = [], []
    for _ in range(NEW_TOKENS):
        last = logits[0, -1].copy()
        last[cfg.pad_token] = -np.inf
        top2 = np.sort(last)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        out.append(int(np.argmax(last)))
        if out[-1] == cfg.eos_token:
            break
        logits, cache = reference.forward(exact, cfg, np.array([[out[-1]]]), cache)
    return out, gaps


@pytest.mark.parametrize("name,impl", CASES)
def test_greedy_generation_through_run_matches_float64(name, impl, monkeypatch):
    """The runner (its bf16 embedding table, prefill into a slot, decode steps, greedy
    sampling) against the float64 rollout, up to the rollout's first near-tie."""
    config = pr.recipe_config(name, impl)
    monkeypatch.setattr(runners, "load_tokenizer", lambda path: IdTokenizer(config.vocab_size))
    model_runner = runners.ModelRunner(model=config, bs_per_device=1)
    # The recipe's weights instead of the runner's own random ones (a copy: the runner owns
    # what load_or_init returns and converts it in place).
    monkeypatch.setattr(model_runner, "load_or_init",
                        lambda *a, **k: jax.tree_util.tree_map(jnp.copy, device_params(name)), raising=False)
    runner = runners.InferenceRunner(name="precision", runner=model_runner, load="", tokenizer_path="ids",
                                     local_mesh_config=(1, 1), pad_sizes=(16,))
    runner.initialize()

    server = runner.run()
    next(server)
    prompt = " ".join(str(int(i)) for i in prompt_tokens(config.vocab_size))
    text = server.send(runners.Request(prompt=prompt, temperature=0.0, max_len=NEW_TOKENS))
    while text is None:
        text = server.send(None)
    got = list(text.completion.tokens)
    if text.completion.finish_reason == "eos":
        got.append(config.eos_token)  # completion tokens exclude the end-of-sequence token

    want, gaps = reference_rollout(name)
    n = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(want))  # steps that must agree
    assert n >= 5, f"the float64 rollout has a near-tie at step {n}: too short a check; change PROMPT_SEED"
    assert got[:n] == want[:n], (
        f"{name}, {impl} MoE: greedy tokens {got[:n]} differ from float64 {want[:n]} "
        f"(top-2 gaps {np.round(gaps[:n], 4).tolist()})")


def test_model_trace_names_every_op_of_the_reference():
    """The study's instrumentation (bench.py precision): every op the reference traces is
    caught in the model too, and the traced run computes the model's logits."""
    r = recipe("2 layers")
    config = pr.recipe_config("2 layers", "fast")
    got = pr.model_trace(config, device_params("2 layers"), r.tokens)
    experts = np.stack([got[f"layer_{i}/experts"] for i in range(2)])
    want = reference.trace(r.exact, config, r.tokens, experts=experts)
    table = pr.compare_traces(got, want, r.valid, 2)
    assert set(table) == set(pr.OPS)
    errors = np.array([v for row in table.values() for v in row])
    assert np.all(np.isfinite(errors)) and errors.max() < 0.05 and table["embed"][0] < 1e-6
    plain = model.make_forward(config)(device_params("2 layers"), jnp.asarray(r.tokens)).logits
    # float32 arithmetic: the traced program fuses differently, so the two agree to float32
    # rounding, not bit for bit.
    assert pr.per_position_rel(got["logits"], np.asarray(plain)).max() < 1e-5
