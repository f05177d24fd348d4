"""Free text as hashed n-gram ids, for the built-in text network.

Each text becomes the ids of its word unigrams and bigrams and of the character
3- and 4-grams of its words (with ``<`` and ``>`` marking the word's edges, as in
fastText), each hashed (``zlib.crc32`` of the UTF-8 n-gram, stable across runs and
machines) into ``NUM_BUCKETS - 1`` buckets; id 0 is padding. The ids of one text
fill a row of an int64 ``(N, L)`` tensor, padded with 0 up to the longest text's
count (at most :data:`MAX_IDS`; a longer text keeps its first ids: every word
unigram and bigram first, then character n-grams). The network
(:class:`~minnorm_audit.training.models.TextNetwork`) averages the embeddings of a
row's ids in an ``nn.EmbeddingBag``, so the cost of a text is linear in its length
and no vocabulary is built or stored.

A column is taken as free text (:func:`detect_text_column`) when its values are long
(median at least :data:`TEXT_MIN_MEDIAN_CHARS` characters), mostly different (at least
:data:`TEXT_MIN_UNIQUE_SHARE` of them) and mostly hold spaces (several words).
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from .dataset import _refuse_mostly_bad
from .labels import _MISSING_TOKENS, _cell_text

NUM_BUCKETS = 1 << 15
MAX_IDS = 512
CHAR_NGRAMS = (3, 4)
TEXT_MIN_MEDIAN_CHARS = 30
TEXT_MIN_UNIQUE_SHARE = 0.5
_WORD = re.compile(r"\w+")


def detect_text_column(frame: pd.DataFrame, candidates: Iterable[str]) -> str | None:
    """The candidate column that holds free text (long, mostly unique values with
    spaces; the longest such when several do), or None."""
    best: tuple[float, str] | None = None
    for name in candidates:
        column = frame[name]
        if not (column.dtype == object or pd.api.types.is_string_dtype(column)):
            continue
        sample = [value for value in column.iloc[:2000].tolist() if not _is_missing_cell(value)]
        if not all(isinstance(value, str) for value in sample):
            continue  # lists (an embedding), bytes (images), mixed cells: not free text
        texts = pd.Series([value.strip() for value in sample], dtype=object)
        texts = texts[~texts.str.lower().isin(_MISSING_TOKENS)]
        if len(texts) < 2:
            continue
        lengths = texts.str.len()
        if lengths.median() < TEXT_MIN_MEDIAN_CHARS or texts.nunique() < TEXT_MIN_UNIQUE_SHARE * len(texts):
            continue
        if texts.str.contains(" ", regex=False).mean() < 0.5:
            continue
        if best is None or lengths.mean() > best[0]:
            best = (float(lengths.mean()), str(name))
    return None if best is None else best[1]


def _is_missing_cell(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


class _Hasher:
    """n-gram -> bucket id in 1..NUM_BUCKETS-1, cached per distinct n-gram."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.word_grams: dict[str, list[int]] = {}

    def id(self, token: str) -> int:
        found = self.ids.get(token)
        if found is None:
            found = 1 + zlib.crc32(token.encode("utf-8", "surrogatepass")) % (NUM_BUCKETS - 1)
            self.ids[token] = found
        return found

    def char_grams(self, word: str) -> list[int]:
        found = self.word_grams.get(word)
        if found is None:
            marked = f"<{word}>"
            found = [self.id("#" + marked[start : start + size]) for size in CHAR_NGRAMS
                     for start in range(len(marked) - size + 1)]
            self.word_grams[word] = found
        return found


def text_ids(text: str, hasher: _Hasher | None = None) -> list[int]:
    """The hashed n-gram ids of one text (at most :data:`MAX_IDS`, none for a text without words)."""
    hasher = hasher or _Hasher()
    words = _WORD.findall(text.lower())
    ids = [hasher.id(word) for word in words]
    ids += [hasher.id(f"{first} {second}") for first, second in zip(words, words[1:])]
    for word in words:
        if len(ids) >= MAX_IDS:
            break
        ids += hasher.char_grams(word)
    return ids[:MAX_IDS]


def encode_texts(column: pd.Series, name: str, shown: str) -> tuple[torch.Tensor, dict[int, str]]:
    """A text column as int64 ids ``(N, L)`` (0 = padding) and {row: reason} for the
    rows whose text is empty or has no words (set aside); raise when that is over
    half of the rows."""
    hasher = _Hasher()
    rows = [text_ids(_cell_text(value), hasher) for value in column.tolist()]
    empty = [row for row, ids in enumerate(rows) if not ids]
    problem = f"empty text (no words) in column {name!r}"
    _refuse_mostly_bad(empty, len(rows), shown, problem, "check the text column")
    width = max((len(ids) for ids in rows), default=1) or 1
    matrix = np.zeros((len(rows), width), dtype=np.int64)
    for row, ids in enumerate(rows):
        matrix[row, : len(ids)] = ids
    return torch.from_numpy(matrix), {row: problem for row in empty}
