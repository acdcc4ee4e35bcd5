"""Offline CLIP tokenizer: fixture ids, an independent BPE oracle, truncation, no network."""

from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest
import torch
from reference_files import fixture_params

from crm_models.multiview import tokenizer as tok_mod
from crm_models.multiview.tokenizer import (
    DEFAULT_BPE_PATH,
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    OpenCLIPTokenizer,
    TokenizerError,
)

CLIP_FIXTURES = fixture_params("multiview", "tiny_clip_case_*.npz")

EXTRA_TEXTS = [
    "3D assets.",
    "A photo of a cat, sitting on a mat!!! (really?)",
    "It's the dog's toy; they'll've gone -- won't they?",
    "numbers 1234567 and 3.14159 and 2nd/3rd",
    "Ünïcödé café naïve façade — “quotes” and ‘apostrophes’ … ellipsis",
    "日本語のテキスト 中文 한국어 emoji 🐶🚀✨",
    "  multiple   spaces\tand\ttabs\nand newlines  ",
    "UPPER lower MiXeD CaSe",
    "symbols: @#$%^&*_+=[]{}|\\<>/~` and under_scores",
]


@pytest.fixture(scope="module")
def tokenizer() -> OpenCLIPTokenizer:
    return OpenCLIPTokenizer()


@pytest.mark.parametrize("path", CLIP_FIXTURES)
def test_fixture_token_ids(path, tokenizer):
    d = np.load(path)
    prompts = [str(p) for p in d["text/prompts"]]
    ids = tokenizer(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    np.testing.assert_array_equal(ids.numpy(), d["text/token_ids"])


def test_known_prompt(tokenizer):
    # SPEC §3: "3D assets" -> [49406, 274, 323, 13170, 49407] + zeros
    ids = tokenizer("3D assets")[0]
    assert ids[:5].tolist() == [49406, 274, 323, 13170, 49407]
    assert int(ids[5:].abs().sum()) == 0


def _oracle():
    """An independent CLIP BPE built with the `tokenizers` library (via transformers' CLIPTokenizer)
    from the same merges file; its byte order comes from transformers' own bytes_to_unicode."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        unk_token="<end_of_text>",
        pad_token="<end_of_text>",
    )


def test_matches_independent_bpe_oracle(tokenizer):
    """BPE ids equal the oracle's once the text has had open_clip's ftfy repair (which, e.g.,
    straightens curly quotes); the oracle's own normaliser only does NFC/whitespace/lower-case."""
    import ftfy

    oracle = _oracle()
    for text in EXTRA_TEXTS:
        expected = oracle(ftfy.fix_text(text))["input_ids"]
        assert expected[0] == SOT_TOKEN_ID and expected[-1] == EOT_TOKEN_ID
        expected = expected[:77]
        if len(expected) == 77:
            expected[-1] = EOT_TOKEN_ID
        got = tokenizer(text)[0].tolist()
        assert got[: len(expected)] == expected, text
        assert all(v == 0 for v in got[len(expected) :]), text


def test_truncation_forces_eot(tokenizer):
    long_text = " ".join(f"word{i} extraordinary" for i in range(100))
    ids = tokenizer([long_text, "short"])
    assert ids.shape == (2, 77)
    row = ids[0]
    assert row[0] == SOT_TOKEN_ID and row[76] == EOT_TOKEN_ID
    assert (row != 0).all()
    assert (row[1:76] != EOT_TOKEN_ID).all()
    assert len(tokenizer.encode(long_text)) > 75
    # prefix of the truncated row equals the untruncated encoding
    assert row[1:76].tolist() == tokenizer.encode(long_text)[:75]


def test_empty_and_whitespace_normalisation(tokenizer):
    empty = tokenizer("")[0]
    assert empty[:2].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID] and int(empty[2:].abs().sum()) == 0
    # the negative prompt has a double space; tokenisation must not depend on it
    assert torch.equal(tokenizer("pixelated,  obscure"), tokenizer("pixelated, obscure"))
    assert torch.equal(tokenizer("Hello   World"), tokenizer("hello world"))
    # HTML entities are unescaped like open_clip's basic_clean does; ftfy straightens curly quotes
    assert torch.equal(tokenizer("cats &amp; dogs"), tokenizer("cats & dogs"))
    assert torch.equal(tokenizer("\u201cquoted\u201d"), tokenizer('"quoted"'))


def test_decode_round_trip(tokenizer):
    ids = tokenizer("a red chair, made of wood")[0]
    assert tokenizer.decode(ids) == "a red chair , made of wood"


def test_custom_context_length(tokenizer):
    ids = tokenizer("one two three four five six", context_length=5)
    assert ids.shape == (1, 5) and ids[0, -1] == EOT_TOKEN_ID and ids[0, 0] == SOT_TOKEN_ID
    with pytest.raises(ValueError):
        tokenizer("x", context_length=1)


def test_works_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tok_mod._load_merges.cache_clear()
    tok = OpenCLIPTokenizer()
    assert tok.vocab_size == 49408
    assert tok("3D assets")[0, :5].tolist() == [49406, 274, 323, 13170, 49407]


def test_vocab_is_package_data():
    assert DEFAULT_BPE_PATH.is_file()
    assert DEFAULT_BPE_PATH.parent.name == "multiview"
    assert DEFAULT_BPE_PATH.stat().st_size > 1_000_000


def test_bad_vocab_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        OpenCLIPTokenizer(bpe_path=tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(TokenizerError, match="not a readable gzip"):
        OpenCLIPTokenizer(bpe_path=bad)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(TokenizerError, match="merges"):
        OpenCLIPTokenizer(bpe_path=short)
    with pytest.raises(TokenizerError, match="str"):
        OpenCLIPTokenizer().encode(123)  # type: ignore[arg-type]
    assert EOT_TOKEN_ID == 49407
