"""Mixed-type table columns as numeric features, and how each was encoded.

A table as people have it mixes numbers with booleans, categories, dates and ids.
Each feature column is encoded by what it holds (:func:`encode_column`):

``numeric``
    Numbers (any numeric dtype, or text that parses as numbers; missing tokens are
    NaN and their rows are set aside as before). The trainer standardizes them.
``boolean``
    Two values that spell true and false in any way pandas or Arrow write them
    (``True``/``False``, ``true``/``false``, ``TRUE``, ``t``/``f``, ``yes``/``no``,
    ``y``/``n``; a bool dtype): one feature, 1.0 for true. A boolean column with
    missing cells is a category instead (missing is its own level).
``datetime``
    A datetime dtype, or text where every present cell parses as a date: numeric
    parts ``year``, ``month``, ``day``, ``weekday`` (0 = Monday) and, when any cell
    has a time of day, ``hour`` (with the minutes as a fraction). A missing date sets
    its row aside, as a missing number does.
``one-hot``
    Any other text or category column with at most :data:`MAX_ONE_HOT_LEVELS` levels:
    one 0/1 feature per level, ``name=level`` (sorted by level; a missing cell is a
    level of its own, ``(missing)``). With more levels, the ``MAX_ONE_HOT_LEVELS - 1``
    most frequent keep their feature and the rarer ones are pooled into ``(other)``,
    when they hold at most :data:`MAX_POOLED_SHARE` of the rows.
``hashed``
    A category whose rare levels hold more rows than that: each level maps to a fixed signed-hash vector of
    :data:`HASH_DIMS` features (feature hashing, Weinberger et al. 2009: the hash of
    ``level#k`` picks a sign for each dimension ``k``), a random embedding that needs
    no vocabulary and gives the same vector for the same level in every run.
``left out``
    A column of text whose every value is different (an id, a name) when the feature
    columns were not named: it cannot generalize, so it is left out with a note.

Hashes are ``blake2b`` of the UTF-8 text, so they do not depend on Python's hash seed.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .labels import _MISSING_TOKENS, _cell_text, _to_numeric

# One 0/1 feature per level up to this many levels (after pooling rare ones).
MAX_ONE_HOT_LEVELS = 32
# Above the cap, the rarest levels may share one "(other)" feature while they hold at
# most this share of the rows; a column whose long tail holds more is hashed instead.
MAX_POOLED_SHARE = 0.1
# Features of a hashed category.
HASH_DIMS = 16
OTHER_LEVEL = "(other)"
MISSING_LEVEL = "(missing)"
_TRUE = frozenset({"true", "t", "yes", "y"})
_FALSE = frozenset({"false", "f", "no", "n"})
# Text that looks like a date: digits with -, / or . between, or ISO with a time.
_DATE_LIKE = re.compile(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?")
# A column where at least this share of the present cells are numbers is numeric with
# stray text (a typo, a decimal comma, a unit) and is refused naming the first such cell,
# not read as a category.
MIN_NUMERIC_SHARE = 0.5
_DECIMAL_COMMA = r"[+-]?\d+,\d+"
# Cut values shown in notes and errors to this many characters (cells may be long).
SHOWN_CHARS = 40


@dataclass
class ColumnEncoding:
    """How one feature column became features (one entry of summary.json's
    ``column_encodings``).

    Attributes
    ----------
    column : str
    encoding : {"numeric", "boolean", "datetime", "one-hot", "hashed", "vector", "left out", "text", "image"}
        ``text``: the column the text network reads (:mod:`.text`); ``image``: a
        Parquet column of encoded images (:mod:`.image_table`).
    features : list of str
        The feature names it gave, in order (empty when left out).
    levels : int or None
        Categories: the distinct levels seen (missing counted as one).
    pooled_levels : int or None
        One-hot: the rare levels pooled into ``(other)`` (0: none).
    note : str or None
        Why, for a column left out.
    """

    column: str
    encoding: str
    features: list[str] = field(default_factory=list)
    levels: int | None = None
    pooled_levels: int | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"column": self.column, "encoding": self.encoding, "features": list(self.features)}
        for name in ("levels", "pooled_levels", "note"):
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        return record


class NumbersWithText(ValueError):
    """A column of mostly numbers holding some text; ``row`` is the first text cell's row."""

    def __init__(self, row: int) -> None:
        super().__init__(row)
        self.row = row


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with ``...``), for messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_column(
    column: pd.Series, name: str, *, named: bool
) -> tuple[np.ndarray | None, ColumnEncoding]:
    """One feature column as float64 ``(N, width)`` (NaN where a number or date is
    missing) and its encoding; ``(None, encoding)`` for a column left out.

    Parameters
    ----------
    column : Series
        The cells (CSV: text; Parquet: native types).
    name : str
        The column name (feature names are built from it).
    named : bool
        The user named this column as a feature: an id-like column is then hashed
        instead of left out.

    Raises
    ------
    NumbersWithText
        At least :data:`MIN_NUMERIC_SHARE` of the present cells are numbers but not all.
    """
    values, first_text_row = _to_numeric(column)
    is_bool_dtype = pd.api.types.is_bool_dtype(column)
    if values is not None and not is_bool_dtype:
        return values.reshape(-1, 1), ColumnEncoding(name, "numeric", [name])
    if pd.api.types.is_datetime64_any_dtype(column):
        return _datetime_parts(pd.to_datetime(column), name)
    texts = pd.Series([_cell_text(value) for value in column.tolist()], dtype=object)
    missing = texts.str.lower().isin(_MISSING_TOKENS).to_numpy()
    present = texts[~missing]
    # A number written with a decimal comma ("1,5") counts as a number here.
    looks_numeric = pd.to_numeric(present, errors="coerce").notna() | present.astype(str).str.fullmatch(_DECIMAL_COMMA)
    if not is_bool_dtype and len(present) and looks_numeric.mean() >= MIN_NUMERIC_SHARE:
        raise NumbersWithText(first_text_row)
    distinct = set(present.str.lower().unique().tolist())
    spells_boolean = len(distinct) <= 2 and len(distinct & _TRUE) <= 1 and len(distinct & _FALSE) <= 1
    if distinct and distinct <= (_TRUE | _FALSE) and spells_boolean and not missing.any():
        ones = texts.str.lower().isin(_TRUE).to_numpy(dtype=np.float64)
        return ones.reshape(-1, 1), ColumnEncoding(name, "boolean", [name])
    if len(present) and _looks_like_dates(present):
        dates = pd.to_datetime(texts.where(~missing), errors="coerce", format="mixed")
        if dates.notna().sum() == len(present):
            return _datetime_parts(dates, name)
    levels = texts.where(~missing, MISSING_LEVEL)
    counts = levels.value_counts()
    if not named and len(present) >= 10 and present.nunique() == len(present) and not missing.any():
        note = (f"column {name!r} holds a different text in every row (an id or a name, e.g. "
                f"{shorten(str(present.iloc[0]))!r}), so it is not used as a feature (name it in the feature columns "
                "to use it, hashed)")
        return None, ColumnEncoding(name, "left out", note=note)
    # Beyond the cap, the most frequent levels keep their own feature and the rest share
    # "(other)", unless that pools so many rows that the column would say little.
    pooled = counts.iloc[MAX_ONE_HOT_LEVELS - 1:] if len(counts) > MAX_ONE_HOT_LEVELS else counts.iloc[:0]
    if pooled.sum() <= MAX_POOLED_SHARE * len(column):
        one_hot_levels = sorted(str(level) for level in counts.index[: len(counts) - len(pooled)])
        if len(pooled):
            levels = levels.where(~levels.isin(set(pooled.index.tolist())), OTHER_LEVEL)
            one_hot_levels.append(OTHER_LEVEL)
        position = {level: index for index, level in enumerate(one_hot_levels)}
        codes = levels.map(position).to_numpy(dtype=np.int64)
        matrix = np.zeros((len(column), len(one_hot_levels)), dtype=np.float64)
        matrix[np.arange(len(column)), codes] = 1.0
        features = [f"{name}={level}" for level in one_hot_levels]
        return matrix, ColumnEncoding(name, "one-hot", features, levels=int(len(counts)), pooled_levels=int(len(pooled)))
    return _hashed(levels, name), ColumnEncoding(name, "hashed", [f"{name}#{k}" for k in range(HASH_DIMS)],
                                                 levels=int(len(counts)))


def _looks_like_dates(present: pd.Series) -> bool:
    sample = present.iloc[:50].astype(str)
    return bool(sample.str.fullmatch(_DATE_LIKE).all())


def _datetime_parts(dates: pd.Series, name: str) -> tuple[np.ndarray, ColumnEncoding]:
    """year, month, day, weekday (and hour + minutes / 60 when any cell has a time)."""
    dates = pd.Series(dates)
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_convert("UTC").dt.tz_localize(None)
    parts = {"year": dates.dt.year, "month": dates.dt.month, "day": dates.dt.day, "weekday": dates.dt.day_of_week}
    hours = dates.dt.hour + dates.dt.minute / 60.0 + dates.dt.second / 3600.0
    if (hours.fillna(0) != 0).any():
        parts["hour"] = hours
    matrix = np.column_stack([part.to_numpy(dtype=np.float64, na_value=np.nan) for part in parts.values()])
    return matrix, ColumnEncoding(name, "datetime", [f"{name}.{part}" for part in parts])


def _hashed(levels: pd.Series, name: str) -> np.ndarray:
    """Each level as a fixed +-1/sqrt(HASH_DIMS) vector (one blake2b digest per distinct level)."""
    unique = levels.unique().tolist()
    table = np.empty((len(unique), HASH_DIMS), dtype=np.float64)
    for index, level in enumerate(unique):
        digest = hashlib.blake2b(f"{name}\x00{level}".encode("utf-8", "surrogateescape"), digest_size=HASH_DIMS // 8 or 1)
        bits = np.unpackbits(np.frombuffer(digest.digest(), dtype=np.uint8))[:HASH_DIMS]
        table[index] = (bits.astype(np.float64) * 2.0 - 1.0) / math.sqrt(HASH_DIMS)
    position = {level: index for index, level in enumerate(unique)}
    return table[levels.map(position).to_numpy(dtype=np.int64)]
