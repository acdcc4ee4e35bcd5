"""Offline CLIP byte-level BPE tokenizer producing the same ids as ``open_clip.tokenize``.

The CRM conditioning text goes through open_clip's tokenizer: text cleanup (``ftfy.fix_text``,
HTML unescaping twice, whitespace collapsing, lower-casing), a regex pre-split into words, numbers
and punctuation runs, byte-to-unicode mapping, BPE merges, then ``[SOT] + ids + [EOT]`` padded with
zeros (or truncated with EOT forced at the last position) to the context length of 77.

The merges table ``bpe_simple_vocab_16e6.txt.gz`` ships next to this module as package data, so
tokenisation never needs network access. It is the vocabulary released with OpenAI's CLIP and
redistributed by open_clip; both are MIT licensed (see ``BPE_VOCAB_NOTICE``).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from pathlib import Path

import regex
import torch

try:  # ftfy only repairs broken unicode (mojibake); plain text tokenises identically without it
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a declared dependency
    ftfy = None

__all__ = [
    "BPE_VOCAB_NOTICE",
    "DEFAULT_BPE_PATH",
    "EOT_TOKEN_ID",
    "SOT_TOKEN_ID",
    "OpenCLIPTokenizer",
    "TokenizerError",
]

DEFAULT_BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
# Number of merges used by CLIP: the vocabulary has 49408 entries = 2 * 256 byte symbols
# (with and without the end-of-word marker) + merges + 2 special tokens.
_NUM_MERGES = 49408 - 2 * 256 - 2
_END_OF_WORD = "</w>"

BPE_VOCAB_NOTICE = """\
bpe_simple_vocab_16e6.txt.gz: byte-level BPE merges of OpenAI CLIP, as redistributed by open_clip.
OpenAI CLIP: MIT License, Copyright (c) 2021 OpenAI.
open_clip: MIT License, Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini,
Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi,
Ali Farhadi, Ludwig Schmidt.
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.
"""

# Pre-tokenisation: the two special tokens, English contractions, letter runs, single digits, and
# runs of anything that is neither whitespace, letter nor digit.
_SPLIT_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


class TokenizerError(ValueError):
    """The BPE vocabulary is missing/corrupt, or the input is not text."""


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The reversible byte -> printable unicode character table, and the vocabulary order.

    Printable Latin-1 bytes keep their own character; the remaining 68 bytes are mapped, in byte
    order, to code points 256, 257, ... so that no byte becomes whitespace or a control character.

    Returns:
        (table, order): ``table[b]`` is the character of byte ``b``; ``order`` lists the 256
        characters in vocabulary order (the printable bytes first, then the remapped ones).
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\xa1"), ord("\xac") + 1))
    printable |= set(range(ord("\xae"), ord("\xff") + 1))
    table = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    order = [table[b] for b in sorted(printable)] + [table[b] for b in range(256) if b not in printable]
    return tuple(table), tuple(order)


@functools.lru_cache(maxsize=4)
def _load_merges(path: str) -> tuple[tuple[str, str], ...]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError as exc:
        raise TokenizerError(f"BPE vocabulary not found: {path}") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"BPE vocabulary {path} is not a readable gzip text file: {exc}") from exc
    # Line 0 is a version header; CLIP uses the first _NUM_MERGES merges after it.
    body = lines[1 : 1 + _NUM_MERGES]
    if len(body) != _NUM_MERGES:
        raise TokenizerError(f"BPE vocabulary {path} has {len(body)} merges, expected {_NUM_MERGES}")
    merges = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"BPE vocabulary {path}: line {n} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


class OpenCLIPTokenizer:
    """Text -> (B, context_length) int64 token ids, identical to ``open_clip.tokenize``.

    Args:
        bpe_path: merges file (default: the packaged ``bpe_simple_vocab_16e6.txt.gz``;
            ``$CRM_CLIP_BPE_PATH`` overrides the default).
        context_length: output length (77 for every CLIP model used by CRM).
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        path = bpe_path or os.environ.get("CRM_CLIP_BPE_PATH") or DEFAULT_BPE_PATH
        self.bpe_path = Path(path)
        self.context_length = int(context_length)
        merges = _load_merges(str(self.bpe_path))
        self._byte_to_char, base_order = _byte_symbols()
        vocab = list(base_order) + [c + _END_OF_WORD for c in base_order]
        vocab += [a + b for a, b in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if self.encoder[SOT_TOKEN] != SOT_TOKEN_ID or self.encoder[EOT_TOKEN] != EOT_TOKEN_ID:
            raise TokenizerError(f"BPE vocabulary {self.bpe_path} gives unexpected special-token ids")
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self._ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}
        self._char_to_byte = {c: b for b, c in enumerate(self._byte_to_char)}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def sot_token_id(self) -> int:
        return SOT_TOKEN_ID

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN_ID

    # -- text normalisation ------------------------------------------------------------------
    @staticmethod
    def normalize(text: str) -> str:
        """ftfy repair, HTML unescape (twice), strip, collapse whitespace, lower-case."""
        if ftfy is not None:
            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    # -- BPE ------------------------------------------------------------------------------------
    def _bpe(self, token: str) -> tuple[str, ...]:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        symbols = list(token[:-1]) + [token[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            best_rank, best_pair = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = self._ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            first, second = best_pair
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self._cache) < 100_000:
            self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE ids of one string, without SOT/EOT and without padding or truncation."""
        if not isinstance(text, str):
            raise TokenizerError(f"expected a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _SPLIT_PATTERN.findall(self.normalize(text)):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self._byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe(mapped))
        return ids

    def decode(self, ids) -> str:
        """Ids -> text (up to normalisation); stops at EOT, skips SOT."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == EOT_TOKEN_ID:
                break
            if i == SOT_TOKEN_ID:
                continue
            token = self.decoder[i]
            word_end = token.endswith(_END_OF_WORD)
            if word_end:
                token = token[: -len(_END_OF_WORD)]
            data.extend(self._char_to_byte[c] for c in token)
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenise a string or a list of strings.

        Returns:
            LongTensor (B, context_length): ``[SOT, ids..., EOT, 0, ...]``; longer texts are
            truncated to ``context_length`` with EOT forced at the last position.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2, got {length}")
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_TOKEN_ID, *self.encode(text), EOT_TOKEN_ID]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = EOT_TOKEN_ID
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
