"""runners._TextStream, the incremental detokenizer: over many random token sequences its
pieces add up to SentencePiece's whole-text decode, with and without a prompt before them,
and a long text costs the same per token as a short one (a bounded window is decoded).

The tiny demo tokenizer always; the Grok-1 tokenizer (byte pieces, no whitespace collapsing)
too when GROK1_TOKENIZER names its tokenizer.model.
"""

from __future__ import annotations

import os
import random

import pytest
import sentencepiece

import run
import runners


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    path = run.train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))
    return sentencepiece.SentencePieceProcessor(model_file=path)


TOKENIZERS = ["tiny"] + (["grok"] if os.environ.get("GROK1_TOKENIZER") else [])


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request, tiny_tokenizer):
    if request.param == "tiny":
        return tiny_tokenizer
    return sentencepiece.SentencePieceProcessor(model_file=os.environ["GROK1_TOKENIZER"])


def random_sequences(sp, count: int, seed: int, max_len: int = 40):
    """Token lists that stress the hard cases: byte pieces (multi-byte characters split
    anywhere, invalid bytes), control tokens, [UNK], lone and leading spaces."""
    rng = random.Random(seed)
    vocab = sp.vocab_size()
    special = [i for i in range(vocab) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    spaces = [i for i in range(vocab) if sp.id_to_piece(i).startswith("\u2581")][:64]
    utf8 = [i for i in range(vocab) if sp.is_byte(i) and int(sp.id_to_piece(i)[3:5], 16) >= 0x80]
    # Whole characters cut into their bytes, where the tokenizer has byte pieces.
    chars = [[sp.piece_to_id(f"<0x{b:02X}>") for b in c.encode()] for c in "é漢字😀ß"] if utf8 else []
    pools = [special + spaces, range(vocab), special, spaces]
    for _ in range(count):
        pool = rng.choice(pools)
        tokens: list[int] = []
        while len(tokens) < rng.randint(1, max_len):
            r = rng.random()
            if chars and r < 0.15:
                tokens += rng.choice(chars)
            elif r < 0.7:
                tokens.append(rng.choice(pool))
            else:
                tokens.append(rng.randrange(vocab))
        yield tokens


def streamed(sp, tokens, context=()):
    stream = runners._TextStream(sp, context)
    pieces = [stream.push(t) for t in tokens]
    return pieces, stream.finish()


def test_pieces_add_up_to_the_whole_decode(tokenizer):
    sp = tokenizer
    for tokens in random_sequences(sp, 1500, seed=0):
        pieces, rest = streamed(sp, tokens)
        assert "".join(pieces) + rest == sp.decode(tokens), [sp.id_to_piece(t) for t in tokens]


def test_pieces_after_a_prompt_continue_its_text(tokenizer):
    """With the prompt's last tokens as context, the pieces are the whole text's tail: the
    first one keeps the space that joins it to the prompt."""
    sp = tokenizer
    prompts = random_sequences(sp, 1500, seed=1, max_len=12)
    for prompt, tokens in zip(prompts, random_sequences(sp, 1500, seed=2)):
        whole, head = sp.decode(prompt + tokens), sp.decode(prompt)
        if not whole.startswith(head):  # the prompt ends inside a character the output completes
            continue
        pieces, rest = streamed(sp, tokens, prompt[-8:])
        assert "".join(pieces) + rest == whole[len(head):], ([sp.id_to_piece(t) for t in prompt],
                                                              [sp.id_to_piece(t) for t in tokens])
    ids = sp.encode("The river")
    pieces, rest = streamed(sp, sp.encode("runs"), ids)
    assert "".join(pieces) + rest == " runs"


def test_text_arrives_token_by_token_and_waits_for_whole_characters(tiny_tokenizer):
    sp = tiny_tokenizer
    words = sp.encode("the river runs to the sea")
    pieces, rest = streamed(sp, words)
    assert all(pieces) and rest == ""  # every word piece is out as soon as it is sampled
    grok = os.environ.get("GROK1_TOKENIZER")
    if grok:
        sp = sentencepiece.SentencePieceProcessor(model_file=grok)
        e6, bc, a2 = (sp.piece_to_id(f"<0x{b:02X}>") for b in "漢".encode())
        pieces, rest = streamed(sp, [sp.piece_to_id("\u2581a"), e6, bc, a2])
        assert pieces == ["a", "", "", "漢"] and rest == ""


def test_cost_per_token_does_not_grow_with_the_text(tiny_tokenizer):
    """Counted in decoded tokens, not seconds: the window stays a few tokens long."""
    sp = tiny_tokenizer
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return sp.decode(ids)

        def is_control(self, i):
            return sp.is_control(i)

    rng = random.Random(3)
    tokens = [rng.randrange(4, sp.vocab_size()) for _ in range(3000)]
    stream = runners._TextStream(Counting())
    text = "".join(stream.push(t) for t in tokens) + stream.finish()
    assert text == sp.decode(tokens)
    assert sum(decoded) / len(tokens) < 12 and max(decoded) < 40
