"""Tests of run.py: the tiny demo end to end, the missing-files message, --help, and the
release's run.py flow (its exact calls) against a tiny config."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model
import run
from runners import InferenceRunner, ModelRunner, sample_from_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(args, cwd=REPO, single_device=True, timeout=300):
    env = dict(os.environ)
    if single_device:  # as on a user's CPU machine: one device
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_demo_runs_end_to_end(tmp_path):
    proc = run_py(["--tiny", "--tiny-dir", str(tmp_path), "--max-len", "12",
                   "--prompt", "The river", "--prompt", "On a clear night far from the lights"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "released checkpoint format" in out and "random" in out
    assert out.count("Output for prompt:") == 2 and "2 slot(s)" in out
    assert out.count("(12 tokens, stopped at max_len)") + out.count("stopped at eos") == 2
    # What it wrote is the released layout: tensor files + a tokenizer with Grok-1's special ids.
    files = sorted(os.listdir(tmp_path / "ckpt-0"))
    assert files[0] == "tensor00000_000" and len(files) == len(
        [leaf for leaf in model.param_shapes(run.tiny_demo_config()).values() for _ in leaf])
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert sp.vocab_size() <= run.TINY_VOCAB


def test_missing_weights_exit_2_with_download_instructions(tmp_path):
    proc = run_py([], cwd=str(tmp_path))  # the default: ./checkpoints/ckpt-0 and ./tokenizer.model
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for needle in ("xai-org/grok-1", "ckpt-0/*", "tokenizer.model", "320 GB", "python run.py --tiny",
                   "./checkpoints/ckpt-0", "./tokenizer.model"):
        assert needle in proc.stderr, needle


def test_main_reports_missing_files_and_bad_flags(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    code = run.main(["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok.model")])
    err = capsys.readouterr().err
    assert code == 2 and "no tensor files" in err and "tok.model' does not exist" in err
    with pytest.raises(SystemExit) as info:
        run.main(["--mesh", "8"])
    assert info.value.code == 2 and "expected DATAxMODEL" in capsys.readouterr().err
    assert run.parse_mesh("2x4") == (2, 4)
    code = run.main(["--tiny", "--tiny-dir", str(tmp_path / "demo"), "--top-p", "1.5"])
    assert code == 2 and "nucleus_p (top_p)=1.5" in capsys.readouterr().err


def test_help_documents_every_flag():
    text = run.build_parser().format_help()
    for flag in ("--tiny", "--tiny-dir", "--prompt", "--max-len", "--temperature", "--top-p", "--seed",
                 "--checkpoint", "--tokenizer", "--mesh", "--moe-impl", "--stream"):
        assert flag in text, flag
    assert "xai-org/grok-1" in text and "320 GB" in text


def test_release_run_py_flow_on_a_tiny_config(tmp_path):
    """The release's run.py, call for call, with its config swapped for a tiny one."""
    CKPT_PATH = str(tmp_path)  # the release passes "./checkpoints/", whose ckpt-0 holds the tensors
    _, tokenizer_path = run.build_tiny_demo(CKPT_PATH)
    grok_1_model = dataclasses.replace(run.tiny_demo_config(), sequence_len=1024)

    inference_runner = InferenceRunner(
        pad_sizes=(1024,),
        runner=ModelRunner(
            model=grok_1_model,
            bs_per_device=0.125,
            checkpoint_path=CKPT_PATH,
        ),
        name="local",
        load=CKPT_PATH,
        tokenizer_path=tokenizer_path,
        local_mesh_config=(1, 8),
        between_hosts_config=(1, 1),
    )
    inference_runner.initialize()
    gen = inference_runner.run()

    inp = "The answer to life the universe and everything is of course"
    out = sample_from_model(gen, inp, max_len=100, temperature=0.01)
    print(f"Output for prompt: {inp}", out)

    assert isinstance(out, str) and out == inference_runner.tokenizer.decode(out.completion.tokens)
    c = out.completion
    assert len(c.tokens) == 100 or (c.finish_reason == "eos" and len(c.tokens) < 100)
    assert len(set(c.tokens)) > 5  # not one token repeated
    # One slot (0.125 x 8 devices), on a (1, 8) mesh, with the weights sharded over it.
    runner = inference_runner.runner
    assert runner.batch_size == 1 and dict(runner.mesh.shape) == {"data": 1, "model": 8}
    w = inference_runner.params["transformer/decoder_layer_0/moe/linear"]["w"]
    # (stored transposed for the kernels: the [E, F, D] matrix split (None, model, data)).
    assert w.weight.sharding.spec == P(None, "model", "data") and len(w.weight.sharding.device_set) == 8
    saved = run.tiny_demo_params(run.tiny_demo_config())
    np.testing.assert_array_equal(np.swapaxes(np.asarray(w.weight), -1, -2),
                                  np.asarray(saved["transformer/decoder_layer_0/moe/linear"]["w"].weight))
    # The generator goes on serving; the same request (seed 42) gives the same tokens.
    again = sample_from_model(gen, inp, max_len=20, temperature=0.01)
    assert again.completion.tokens == c.tokens[:20]


def test_plan_flag_prints_the_planners_verdict(capsys):
    import json

    assert run.main(["--plan", "--devices", "8", "--device-memory-gb", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["mesh"] == {"data": 1, "model": 8}
    assert run.main(["--plan", "--devices", "4", "--device-memory-gb", "80"]) == 1  # 4 x 80 GB is too small
    assert "Smallest device count that fits" in capsys.readouterr().out


@pytest.fixture
def cache_off_afterwards():
    """run.main turns a persistent compilation cache on for the whole process: turn it off."""
    yield
    import runners

    runners.enable_compilation_cache("off")


def test_random_weights_smoke_test_and_its_compilation_cache(tmp_path, capsys, cache_off_afterwards):
    """--random-weights runs the whole runner with no checkpoint and prints the start-up split;
    a second start finds every program in the --compile-cache directory."""
    import jax

    cache = tmp_path / "cache"
    argv = ["--random-weights", "--tiny", "--layers", "1", "--mesh", "1x2", "--max-len", "5",
            "--prompt", "The river", "--prompt", "Bread and water", "--temperature", "0",
            "--checkpoint", str(tmp_path / "none"), "--compile-cache", str(cache)]
    jax.clear_caches()  # programs compiled by earlier tests would never reach the cache
    assert run.main(argv) == 0
    first = capsys.readouterr().out
    assert "Random weights, no checkpoint: the demo model with 1 layers" in first
    assert "demo tokenizer" in first  # no ./tokenizer.model here
    assert "mesh {'data': 1, 'model': 2}, 2 slot(s)" in first
    for part in ("set-up", "weight creation on the devices", "lowering prefill 32", "lowering prefill 128",
                 "lowering decode", "compile prefill 32", "compile prefill 128", "compile decode", "First token"):
        assert part in first, part
    assert first.count("(5 tokens, stopped at max_len)") + first.count("stopped at eos") == 2
    assert f"compilation cache: {cache}: 0 program(s) read from it" in first
    assert len(os.listdir(cache)) >= 3  # at least prefill x 2 and decode

    jax.clear_caches()  # a new start, as far as compiled programs go
    assert run.main(argv) == 0
    second = capsys.readouterr().out
    assert ", 0 compiled and written" in second and " 0 program(s) read" not in second
    outputs = lambda text: [line for line in text.splitlines() if line.startswith("Output for prompt")]  # noqa: E731
    assert outputs(second) == outputs(first)  # greedy, same seed: the cached programs agree


def test_random_weights_flag_errors(tmp_path, capsys):
    text = run.build_parser().format_help()
    assert "--random-weights" in text and "--layers" in text and "--compile-cache" in text
    assert run.main(["--random-weights", "--tiny", "--tokenizer", str(tmp_path / "tok.model")]) == 2
    assert "tok.model' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's range check: one line, exit 2
        run.main(["--random-weights", "--layers", "0"])
    assert info.value.code == 2 and "argument --layers" in capsys.readouterr().err
    assert run.main(["--layers", "4", "--checkpoint", str(tmp_path)]) == 2  # a checkpoint fixes the depth
    assert "--random-weights" in capsys.readouterr().err
