"""Safety of run.py, planner.py and runners.py (issue 13, classes 1, 5, 6, 7, 11, 12).

1  --tiny-dir never overwrites what the demo did not write.
5  the planner's command line refuses out-of-range numbers and answers any device count fast.
6  huge temperatures never sample a masked token (nor NaN probabilities).
7  several threads may share one InferenceRunner; each gets exactly its solo output.
11 bad prompts and bad tokenizer files are refused before any weight is loaded.
12 nonsense process counts and ids are refused.

Command-line cases call run.main / planner.main in-process and check exit status 2 and a
one-line message. The runner is a tiny random model on one device.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import planner
import run
import runners
from runners import InferenceRunner, InvalidRequestError, ModelRunner, Request, RunnerBusyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_code(call, *args):
    """The status a CLI entry point ends with: its return value, or SystemExit's code."""
    try:
        return call(*args)
    except SystemExit as e:
        return e.code


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def tree_bytes(root) -> dict:
    """{relative path: file bytes} of every file under root (for before/after checks)."""
    out = {}
    for base, _, names in os.walk(root):
        for n in names:
            path = os.path.join(base, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ---------------------------------------------------------------------------------------
# 1. --tiny-dir
# ---------------------------------------------------------------------------------------


def test_tiny_dir_dot_in_the_readme_layout_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints" / "ckpt-0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ckpt-0" / "tensor00000_000").write_bytes(b"real weights" * 100)
    (tmp_path / "tokenizer.model").write_bytes(b"the real tokenizer")
    before = tree_bytes(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert exit_code(run.main, ["--tiny", "--tiny-dir", "."]) == 2
    line = one_line(capsys.readouterr().err)
    assert "./tokenizer.model" in line and "refusing" in line and "did not make" in line
    assert tree_bytes(tmp_path) == before  # nothing written, nothing replaced


@pytest.mark.parametrize("layout, named", [
    ({"ckpt-0/tensor00000_000": b"x" * 64}, "ckpt-0"),
    ({"tokenizer.vocab": b"mine"}, "tokenizer.vocab"),
    ({"notes.txt": b"hello"}, "notes.txt"),  # nothing to replace, but not ours either
])
def test_tiny_dir_with_foreign_files_is_refused(tmp_path, capsys, layout, named):
    for rel, data in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    before = tree_bytes(tmp_path)
    assert run.main(["--tiny", "--tiny-dir", str(tmp_path), "--max-len", "2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert named in line and "refusing" in line
    assert tree_bytes(tmp_path) == before


def test_tiny_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_bytes(b"data")
    assert run.main(["--tiny", "--tiny-dir", str(tmp_path / "f")]) == 2
    assert "is not a directory" in one_line(capsys.readouterr().err)
    assert (tmp_path / "f").read_bytes() == b"data"


def test_tiny_demo_replaces_only_its_own_files(tmp_path):
    d = str(tmp_path / "demo")
    ckpt, tok = run.build_tiny_demo(d)
    marker = json.loads((tmp_path / "demo" / run.TINY_MARKER).read_text())
    on_disk = {rel: hashlib.sha256(data).hexdigest() for rel, data in tree_bytes(d).items()
               if rel != run.TINY_MARKER}
    assert marker["files"] == on_disk and "tokenizer.model" in on_disk
    assert sum(rel.startswith("ckpt-0/") for rel in on_disk) == len(os.listdir(ckpt)) > 10

    # A leftover of an interrupted build is cleaned up; the demo's own files are rebuilt.
    os.mkdir(os.path.join(d, run.TINY_STAGING_PREFIX + "killed"))
    run.build_tiny_demo(d)
    assert sorted(os.listdir(d)) == sorted([run.TINY_MARKER, *run.TINY_OUTPUTS])

    # A file that differs from what the demo wrote is never replaced.
    victim = os.path.join(ckpt, "tensor00003_000")
    with open(victim, "ab") as f:
        f.write(b"user data")
    changed = tree_bytes(d)
    with pytest.raises(run.TinyDirError, match="tensor00003_000.*not what run.py --tiny wrote"):
        run.build_tiny_demo(d)
    assert tree_bytes(d) == changed

    # Nor a symlink put in the demo's place.
    os.remove(victim)
    os.rename(tok, tok + ".real")
    os.symlink(tok + ".real", tok)
    with pytest.raises(run.TinyDirError, match="tokenizer.model"):
        run.build_tiny_demo(d)
    assert os.path.islink(tok)


# ---------------------------------------------------------------------------------------
# 5. The planner's command line
# ---------------------------------------------------------------------------------------

BAD_PLAN_ARGS = [
    (["--device-memory-gb", "inf"], "--device-memory-gb"),
    (["--device-memory-gb", "1e300"], "--device-memory-gb"),
    (["--device-memory-gb", "-80"], "--device-memory-gb"),
    (["--device-memory-gb", "nan"], "--device-memory-gb"),
    (["--device-memory-gb", "0"], "--device-memory-gb"),
    (["--layers", "-1"], "--layers"),
    (["--layers", "0"], "--layers"),
    (["--devices", "0"], "--devices"),
    (["--devices", "-8"], "--devices"),
    (["--batch", "0"], "--batch"),
    (["--context", "-1"], "--context"),
    (["--prefill-batch", "0"], "--prefill-batch"),
    (["--devices", "eight"], "--devices"),
]


@pytest.mark.parametrize("args, flag", BAD_PLAN_ARGS)
@pytest.mark.parametrize("entry", ["planner", "run"])
def test_plan_flags_out_of_range_exit_2(capsys, args, flag, entry):
    full = ["--devices", "8", "--device-memory-gb", "80", *args]
    code = exit_code(planner.main, full) if entry == "planner" else exit_code(run.main, ["--plan", *full])
    assert code == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert f"argument {flag}" in line and args[-1] in line and captured.out == ""


def test_layers_override_is_applied_not_ignored(capsys):
    assert planner.main(["--devices", "8", "--device-memory-gb", "80", "--layers", "1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert run.main(["--plan", "--devices", "8", "--device-memory-gb", "80", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    # Grok-1's int8 weights per layer x 64 layers: one layer's share is 1/64 of them.
    assert one["bytes"]["int8_weights"] * 64 == full["bytes"]["int8_weights"]
    assert run.main(["--plan", "--tiny", "--layers", "3", "--devices", "2", "--device-memory-gb", "4",
                     "--json"]) == 0
    tiny3 = json.loads(capsys.readouterr().out)
    assert run.main(["--plan", "--tiny", "--layers", "1", "--devices", "2", "--device-memory-gb", "4",
                     "--json"]) == 0
    tiny1 = json.loads(capsys.readouterr().out)
    assert tiny3["bytes"]["int8_weights"] == 3 * tiny1["bytes"]["int8_weights"]


def _brute_force_layouts(config, n):
    """Every (data, model) with data * model == n that mesh_problems accepts: the definition."""
    return [(n // m, m) for m in range(n, 0, -1) if n % m == 0 and not planner.mesh_problems(config, n // m, m)]


@pytest.mark.parametrize("name", ["grok", "tiny"])
def test_layout_search_equals_the_brute_force_definition(name):
    config = (model.grok_1_config() if name == "grok" else model.tiny_config()).initialize()
    valid = []
    for n in range(1, 200):
        assert planner.valid_meshes(config, n) == _brute_force_layouts(config, n), n
        if _brute_force_layouts(config, n):
            valid.append(n)
    assert planner.valid_device_counts(config, 199) == valid
    assert planner._divisors(100000) == [k for k in range(1, 100001) if 100000 % k == 0]


@pytest.mark.parametrize("entry", ["planner", "run"])
def test_a_huge_device_count_is_answered_without_a_long_search(capsys, monkeypatch, entry):
    calls = []
    real = planner.mesh_problems
    monkeypatch.setattr(planner, "mesh_problems", lambda *a: calls.append(a) or real(*a))
    args = ["--devices", "100000", "--device-memory-gb", "80"]
    code = planner.main(args) if entry == "planner" else run.main(["--plan", *args])
    assert code == 2
    assert len(calls) < 200  # the old search tested every divisor of every count up to 200000
    line = one_line(capsys.readouterr().out)
    assert line.startswith("error: 100000 devices: no (data, model) layout")
    # The suggested counts are real layouts (checked by the definition), 6144 the largest.
    suggested = [int(w) for w in line.split("Use ")[1].replace(" or", ",").split(" devices")[0].split(", ")]
    assert suggested[-1] == 6144 and all(_brute_force_layouts(model.grok_1_config().initialize(), n)
                                         for n in suggested)


# ---------------------------------------------------------------------------------------
# 6. Huge temperatures and the token mask
# ---------------------------------------------------------------------------------------


def test_huge_temperatures_never_sample_a_masked_token():
    vocab, seeds = 32, 64
    temps = np.array([1e6, 1e30, 1e37, 9e37, 1e38, 3.4e38, np.inf], np.float32)
    logits = np.linspace(-4.0, 6.0, vocab).astype(np.float32)
    logits[7] = np.nan  # a broken logit on an allowed token: treated as -inf
    mask = np.ones(vocab, bool)
    mask[[0, 5, 31]] = False  # the pad id and the two most likely tokens are not allowed
    mask[30] = False
    b = len(temps) * seeds
    keys = runners.request_keys(jnp.repeat(jnp.arange(seeds, dtype=jnp.uint32)[None], len(temps), 0).ravel(),
                                jnp.zeros((b,), jnp.int32))
    draw = jax.jit(runners.sample_tokens)(jnp.tile(logits, (b, 1)), jnp.tile(mask, (b, 1)),
                                          jnp.repeat(jnp.asarray(temps), seeds), jnp.ones((b,)), keys)
    tokens, probs = np.asarray(draw.token), np.asarray(draw.prob)
    assert mask[tokens].all() and np.isfinite(probs).all()
    # float64 reference: softmax(logits / t) over the allowed tokens (t = inf: the uniform
    # limit); the NaN logit counts as -inf, so its token gets nothing.
    allowed = mask & ~np.isnan(logits)
    for row, token in enumerate(tokens):
        t = np.float64(temps[row // seeds])
        z = np.where(allowed, np.nan_to_num(logits.astype(np.float64)) / t, -np.inf)
        ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert probs[row] == pytest.approx(ref[token], rel=1e-5)
    assert 7 not in tokens and len(set(tokens.tolist())) > 10


def test_a_row_with_no_usable_logit_still_takes_an_allowed_token():
    logits = jnp.full((2, 8), jnp.nan, jnp.float32)
    mask = jnp.asarray([[False, False, True, False, True, False, False, False]] * 2)
    keys = runners.request_keys(jnp.zeros((2,), jnp.uint32), jnp.zeros((2,), jnp.int32))
    draw = jax.jit(runners.sample_tokens)(logits, mask, jnp.asarray([0.0, 1e38]), jnp.ones((2,)), keys)
    assert set(np.asarray(draw.token).tolist()) <= {2, 4}


def test_temperature_above_the_bound_is_an_invalid_request():
    runners.check_request(Request("hi", runners.MAX_TEMPERATURE))
    for t in (runners.MAX_TEMPERATURE * 1.01, 9e37, 1e300):
        with pytest.raises(InvalidRequestError, match=re.escape(f"temperature={t!r}: must be at most")):
            runners.check_request(Request("hi", t))


# ---------------------------------------------------------------------------------------
# 7. One runner, several threads
# ---------------------------------------------------------------------------------------

PROMPTS = ["The river", "On a clear night far from the lights", "The answer to life", "Stars"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny"))
    config = model.tiny_config(vocab_size=run.TINY_VOCAB, sequence_len=64)
    ckpt, tok = run.build_tiny_demo(directory, config)
    return config, ckpt, tok


@pytest.fixture(scope="module")
def runner(assets):
    config, ckpt, tok = assets
    r = InferenceRunner(name="threads", runner=ModelRunner(model=config, bs_per_device=2, checkpoint_path=ckpt),
                        load=ckpt, tokenizer_path=tok, local_mesh_config=(1, 1), pad_sizes=(16,))
    r.initialize()
    return r


def _requests(i):
    """Thread i's requests: greedy and sampled, one or two prompts per call."""
    first = Request(PROMPTS[i % 4], 0.0 if i % 2 else 0.9, 1.0, 100 + i, 6)
    return [first] if i % 3 else [first, Request(PROMPTS[(i + 1) % 4], 1.3, 0.9, 7 * i, 5)]


def test_concurrent_generate_calls_equal_their_solo_outputs(runner):
    n = 6
    solo = [[c.tokens for c in runner.generate(_requests(i))] for i in range(n)]
    got, errors = {}, []
    start = threading.Barrier(n)

    def work(i):
        try:
            start.wait()
            for rep in range(3):
                got[i, rep] = [c.tokens for c in runner.generate(_requests(i))]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert got == {(i, rep): solo[i] for i in range(n) for rep in range(3)}
    assert runner._engine.num_active() == 0 and runner._holder is None


def test_a_second_consumer_waits_for_another_threads_stream(runner):
    solo = runner.generate(_requests(1))[0].tokens
    stream = runner.stream(_requests(2))
    first = next(stream)
    # Same thread: waiting could never end, so it is refused at once.
    with pytest.raises(RunnerBusyError, match="in flight"):
        runner.generate(_requests(1))
    result = []
    other = threading.Thread(target=lambda: result.append(runner.generate(_requests(1))[0].tokens))
    other.start()
    other.join(timeout=3)
    assert other.is_alive() and not result  # blocked while the stream is open
    rest = list(stream)  # the stream goes on undisturbed and finishes
    other.join(timeout=300)
    assert result == [solo]
    assert not first.finished and rest[-1].completion.tokens == runner.generate(_requests(2))[0].tokens


def test_huge_temperature_with_a_mask_end_to_end(runner):
    allowed = [5, 17, 42, 99, 300]
    mask = np.zeros(run.TINY_VOCAB, bool)
    mask[allowed] = True
    c = runner.generate([Request(PROMPTS[0], runners.MAX_TEMPERATURE, 1.0, 3, 12, token_mask=mask)])[0]
    assert set(c.tokens) <= set(allowed) and len(c.tokens) == 12
    np.testing.assert_allclose(c.probs, 1 / len(allowed), rtol=1e-3)  # uniform: |logit gaps| / 1e6


# ---------------------------------------------------------------------------------------
# 11. Prompts and tokenizer checked before the weights load
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def no_loading(monkeypatch, tmp_path):
    """A checkpoint directory that would fail to load, and a runner that must not load it."""
    def refuse(self):
        raise AssertionError("weights were about to load")

    monkeypatch.setattr(InferenceRunner, "initialize", refuse)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tensor00000_000").write_bytes(b"not a pickle")
    return str(ckpt)


@pytest.mark.parametrize("prompt, message", [
    ("abc \udcff def", "lone surrogate U+DCFF (the invalid UTF-8 byte 0xFF"),
    ("\ud800", "lone surrogate U+D800"),
    ("   \n\t ", "encodes to no tokens"),
    ("", "prompt is empty"),
])
def test_bad_prompts_exit_2_before_loading(no_loading, assets, capsys, prompt, message):
    tok = assets[2]
    code = run.main(["--checkpoint", no_loading, "--tokenizer", tok, "--prompt", "fine", "--prompt", prompt])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert message in line and "--prompt 2" in line


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (b"\x00garbage\xff" * 50, "is not a SentencePiece model"),
    (None, "is not a regular file"),  # a directory
])
def test_bad_tokenizer_files_exit_2_before_loading(no_loading, tmp_path, capsys, content, message):
    tok = tmp_path / "tokenizer.model"
    if content is None:
        tok.mkdir()
    else:
        tok.write_bytes(content)
    assert run.main(["--checkpoint", no_loading, "--tokenizer", str(tok)]) == 2
    line = one_line(capsys.readouterr().err)
    assert message in line and str(tok) in line


def test_invalid_utf8_on_the_real_command_line(tmp_path):
    """Bytes that are not UTF-8, as a shell passes them: one line, status 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "--checkpoint", str(tmp_path),
                           "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "byte 0xE9" in one_line(proc.stderr)


# ---------------------------------------------------------------------------------------
# 12. Process counts and ids
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, env, message", [
    (["--num-processes", "0"], {}, "--num-processes 0: the number of processes must be >= 1"),
    (["--num-processes", "-3"], {}, "--num-processes -3: the number of processes must be >= 1"),
    (["--process-id", "3"], {}, "--process-id 3: must be in 0 .. 0 with 1 process"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1"], {}, "must be in 0 .. 1"),
    (["--process-id", "-1"], {}, "--process-id -1"),
    (["--distributed-timeout", "nan"], {}, "--distributed-timeout nan"),
    (["--distributed-timeout", "-5"], {}, "--distributed-timeout -5"),
    ([], {run.ENV_NUM_PROCESSES: "0"}, f"environment variable {run.ENV_NUM_PROCESSES} 0"),
    ([], {run.ENV_PROCESS_ID: "abc"}, f"{run.ENV_PROCESS_ID}='abc' is not a valid int"),
])
def test_bad_process_settings_exit_2(monkeypatch, capsys, args, env, message):
    for key in (run.ENV_COORDINATOR, run.ENV_NUM_PROCESSES, run.ENV_PROCESS_ID, run.ENV_TIMEOUT):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runners, "initialize_distributed", lambda *a: pytest.fail("started a group"))
    assert exit_code(run.main, ["--tiny", *args]) == 2
    assert message in one_line(capsys.readouterr().err)
