"""Query tokenization for the encoder: BERT's WordPiece, in Python over a memory-mapped vocabulary.

It tokenizes exactly as the encoder's Hugging Face ``tokenizer.json`` does (BertNormalizer,
BertPreTokenizer, WordPiece, ``[CLS] ... [SEP]``), tested against the ``tokenizers`` library on
real catalogues and on awkward Unicode. The Rust tokenizer held about 7.6 MiB in every serving
process; this one holds the vocabulary once in the page cache (``WordPiece.save`` writes it as
arrays beside ``tokenizer.json``; the build does).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import REBUILD, StoreFormatError, Vocabulary

DEFAULT_MAX_LENGTH = 256
WORD_CACHE = 2048  # words whose pieces are remembered
SETTINGS_FILE = "wordpiece.json"
VOCABULARY_PREFIX = "wordpiece_vocabulary"

# Code points BertNormalizer pads with spaces (Hugging Face's ranges, 0x2B920 included).
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
# Rust's char::is_whitespace (the White_Space property), which BertNormalizer and
# BertPreTokenizer use.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Dropped by BertNormalizer's clean_text (unassigned code points, Cn, are kept).
_CONTROL = frozenset({"Cc", "Cf", "Co", "Cs"})
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
# The same for ASCII text, at C speed: the control characters out, \t \n \r to spaces; then
# words are runs of letters and digits, and every other printable character is one on its own.
_ASCII_CLEAN = {c: None for c in [*range(32), 127] if chr(c) not in "\t\n\r"} | {
    ord(c): " " for c in "\t\n\r"
}
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9 ]")


class TokenizerConfigError(ValueError):
    """A tokenizer.json this tokenizer does not implement."""


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK)


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize(text: str, lowercase: bool = True) -> str:
    """BertNormalizer: control characters out, whitespace to spaces, CJK characters spaced,
    accents stripped (NFD, non-spacing marks out) and each character lower-cased."""
    if text.isascii():
        text = text.translate(_ASCII_CLEAN)
        return text.lower() if lowercase else text
    kept = []
    for char in text:
        code = ord(char)
        if code in (0, 0xFFFD) or (char not in "\t\n\r" and unicodedata.category(char) in _CONTROL):
            continue
        if char in _WHITESPACE:
            kept.append(" ")
        elif _is_cjk(code):
            kept.append(f" {char} ")
        else:
            kept.append(char)
    text = "".join(kept)
    if not lowercase:
        return text
    stripped = (c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return "".join(c.lower() for c in stripped)  # by character: no final-sigma rule


def pre_tokenize(text: str) -> list[str]:
    """BertPreTokenizer: split at whitespace (dropped) and around each punctuation character."""
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    words: list[str] = []
    for chunk in "".join(" " if c in _WHITESPACE else c for c in text).split():
        start = 0
        for at, char in enumerate(chunk):
            if _is_punctuation(char):
                if at > start:
                    words.append(chunk[start:at])
                words.append(char)
                start = at + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


@dataclass(frozen=True)
class WordPiece:
    """The settings and vocabulary of a BERT WordPiece tokenizer."""

    vocabulary: Vocabulary
    specials: dict[str, int]  # special tokens, matched in the raw text before anything else
    unknown: int
    first: int  # [CLS]
    last: int  # [SEP]
    lowercase: bool = True
    max_word_chars: int = 100
    prefix: str = "##"

    def __post_init__(self) -> None:
        # Words repeat (in titles above all): the pieces of the latest ones are kept, a bounded
        # few hundred kilobytes.
        object.__setattr__(self, "_cached_word", functools.lru_cache(WORD_CACHE)(self._word))
        longest_first = sorted(self.specials, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        object.__setattr__(self, "_special_pattern", pattern)

    @classmethod
    def from_json(cls, path: Path) -> WordPiece:
        """From a Hugging Face tokenizer.json of a BERT tokenizer (anything else is refused)."""
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        normalizer, model = config.get("normalizer") or {}, config.get("model") or {}
        post = config.get("post_processor") or {}
        lowercase = bool(normalizer.get("lowercase"))
        if (
            normalizer.get("type") != "BertNormalizer"
            or not normalizer.get("clean_text")
            or not normalizer.get("handle_chinese_chars")
            or normalizer.get("strip_accents") not in (None, lowercase)
            or (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or post.get("type") != "TemplateProcessing"
            or [next(iter(p)) for p in post.get("single", [])]
            != ["SpecialToken", "Sequence", "SpecialToken"]
        ):
            raise TokenizerConfigError(f"{path}: not a BERT WordPiece tokenizer")
        added = config.get("added_tokens", [])
        if any(t["normalized"] or t["lstrip"] or t["rstrip"] or t["single_word"] for t in added):
            raise TokenizerConfigError(f"{path}: added tokens other than plain special tokens")
        vocab = model["vocab"]
        first, _, last = post["single"]
        return cls(
            Vocabulary.of(vocab),
            {t["content"]: int(t["id"]) for t in added},
            int(vocab[model["unk_token"]]),
            int(vocab[first["SpecialToken"]["id"]]),
            int(vocab[last["SpecialToken"]["id"]]),
            lowercase,
            int(model["max_input_chars_per_word"]),
            model["continuing_subword_prefix"],
        )

    def save(self, directory: Path) -> None:
        self.vocabulary.save(directory / VOCABULARY_PREFIX)
        settings = {
            "specials": self.specials,
            "unknown": self.unknown,
            "first": self.first,
            "last": self.last,
            "lowercase": self.lowercase,
            "max_word_chars": self.max_word_chars,
            "prefix": self.prefix,
        }
        (directory / SETTINGS_FILE).write_text(json.dumps(settings), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> WordPiece:
        """A saved tokenizer, its vocabulary memory-mapped."""
        if not (directory / SETTINGS_FILE).exists():
            raise StoreFormatError(f"{directory}: {REBUILD}")
        settings = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
        return cls(Vocabulary.load(directory / VOCABULARY_PREFIX), **settings)

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text``, without [CLS] and [SEP]."""
        ids: list[int] = []
        pattern = self._special_pattern
        start = 0
        for match in pattern.finditer(text) if pattern else ():
            ids += self._plain_ids(text[start : match.start()])
            ids.append(self.specials[match.group()])
            start = match.end()
        return ids + self._plain_ids(text[start:])

    def _plain_ids(self, text: str) -> list[int]:
        return [
            i
            for word in pre_tokenize(normalize(text, self.lowercase))
            for i in self._cached_word(word)
        ]

    def _word(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first pieces of one word; the whole word is unknown when any
        part of it has no piece."""
        if len(word) > self.max_word_chars:
            return (self.unknown,)
        pieces: list[int] = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = self.vocabulary.get(piece)
                if found is not None:
                    pieces.append(found)
                    start = end
                    break
            else:
                return (self.unknown,)
        return tuple(pieces)


class QueryTokenizer:
    """Tokenize text for the encoder, truncating to ``max_length`` tokens.

    A single query is not padded: padding would only add compute (the Home Depot queries average 6
    tokens). Where requests share an encoder call, the Triton backend pads them to the longest; the
    encoder's attention mask keeps that padding out of every embedding.
    """

    def __init__(self, wordpiece: WordPiece, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.wordpiece = wordpiece
        self.max_length = max_length

    def __call__(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, attention_mask)``, each int64 of shape ``[1, tokens]``."""
        return self.batch([query])

    def encode(self, text: str) -> list[int]:
        """[CLS], the text's first ``max_length - 2`` tokens, [SEP]."""
        pieces = self.wordpiece.ids(text)[: max(self.max_length - 2, 0)]
        return [self.wordpiece.first, *pieces, self.wordpiece.last]

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize many texts, padded to the longest of them."""
        encodings = [self.encode(text) for text in texts]
        width = max(len(e) for e in encodings)
        input_ids = np.zeros((len(texts), width), dtype=np.int64)
        attention_mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, ids in enumerate(encodings):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask
