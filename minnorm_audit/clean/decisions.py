"""Reviewer decisions: the errors :func:`~minnorm_audit.clean.clean` raises, and reading
and checking a decisions CSV (``source``, ``decision``, ``label``) against a run.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DECISIONS", "CleanError", "Decision", "DecisionsError", "read_decisions"]

DECISIONS = ("keep", "drop", "relabel")
_MAX_LISTED_PROBLEMS = 10


class CleanError(ValueError):
    """Cleaning cannot go ahead (bad output path, unknown rule, stale data); one line."""


class DecisionsError(CleanError):
    """A decisions file names sources, decisions or classes the run does not know.

    ``str(err)`` is one line: the first problem (``decisions.csv line 7: unknown
    source 'x.png'``) and the lines of the others; ``problems`` lists them all.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        message = problems[0]
        if len(problems) > 1:
            others = "; ".join(problems[1:_MAX_LISTED_PROBLEMS])
            more = f"; ... ({len(problems) - _MAX_LISTED_PROBLEMS} more)" if len(problems) > _MAX_LISTED_PROBLEMS else ""
            message += f" (and {len(problems) - 1} more: {others}{more})"
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class Decision:
    """A reviewer's decision on one example, as read from a decisions file.

    Attributes
    ----------
    source : str
        The example's ``source`` in ``examples.parquet``.
    decision : {"keep", "drop", "relabel"}
    label : str or None
        The new label, for ``relabel``.
    line : int
        The line of the decisions file (1 is the header).
    """

    source: str
    decision: str
    label: str | None
    line: int



def read_decisions(
    path: str | os.PathLike[str],
    *,
    sources: Any,
    class_names: Any = (),
    set_aside: Any = (),
    regression: bool = False,
) -> list[Decision]:
    """Read and check a decisions CSV (``source``, ``decision``, ``label``).

    Parameters
    ----------
    path : str or Path
        UTF-8 CSV (a byte-order mark is fine) with a header row. Column names are
        matched without case; other columns (e.g. notes) are allowed. Blank rows are
        skipped.
    sources : iterable of str
        The run's audited sources.
    class_names : iterable of str
        The run's classes; a relabel must name one of them.
    set_aside : iterable of str
        The run's set-aside sources (named in a clearer error than "unknown").
    regression : bool, default=False
        A regression run: relabel is not possible.

    Returns
    -------
    list of Decision
        One per source, in file order (repeated identical rows collapse).

    Raises
    ------
    DecisionsError
        Every problem, each with its line: a missing column, an unknown or set-aside
        source, an unknown decision, a relabel without a label or to an unknown
        class, two different decisions for one source.
    """
    shown = str(path)
    known_sources = set(map(str, sources))
    known_classes = [str(name) for name in class_names]
    class_set = set(known_classes)
    set_aside_sources = set(map(str, set_aside))
    problems: list[str] = []
    decided: dict[str, Decision] = {}
    try:
        stream = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except OSError as error:
        raise CleanError(f"cannot read decisions file {shown}: {error.strerror or error}") from None
    with stream:
        reader = csv.reader(stream)
        try:
            header = next(reader, None)
            if header is None:
                raise DecisionsError([f"{shown}: empty file; expected a header row with source, decision, label"])
            columns = {name.strip().lower(): index for index, name in reversed(list(enumerate(header)))}
            missing = [name for name in ("source", "decision") if name not in columns]
            if missing:
                raise DecisionsError([
                    f"{shown} line 1: no {' or '.join(repr(name) for name in missing)} column; "
                    f"its columns are: {', '.join(repr(name) for name in header)}"
                ])
            label_index = columns.get("label")
            end_of_previous = reader.line_num
            for row in reader:
                line = end_of_previous + 1  # where this record starts (a quoted cell may span lines)
                end_of_previous = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue

                def cell(index: int | None, row: list[str] = row) -> str:
                    return row[index].strip() if index is not None and index < len(row) else ""

                raw_source = row[columns["source"]] if columns["source"] < len(row) else ""
                # Exact first (a file name may end in a space), then as typed with stray spaces.
                source = raw_source if raw_source in known_sources else raw_source.strip()
                decision = cell(columns["decision"]).lower()
                label = cell(label_index)
                where = f"{shown} line {line}"
                if not source:
                    problems.append(f"{where}: empty source")
                    continue
                if source not in known_sources:
                    if source in set_aside_sources:
                        problems.append(f"{where}: source {source!r} was set aside in the run (it was not audited)")
                    else:
                        problems.append(f"{where}: unknown source {source!r}")
                    continue
                if decision not in DECISIONS:
                    shown_decision = repr(decision) if decision else "empty decision"
                    problems.append(f"{where}: unknown decision {shown_decision} for {source!r}; use keep, drop or relabel")
                    continue
                if decision == "relabel":
                    if regression:
                        problems.append(f"{where}: relabel is not possible in a regression run ({source!r})")
                        continue
                    if not label:
                        problems.append(f"{where}: relabel of {source!r} needs a label")
                        continue
                    if label not in class_set:
                        problems.append(
                            f"{where}: unknown class {label!r} for {source!r}; the classes are: {_listed(known_classes)}"
                        )
                        continue
                found = Decision(source, decision, label if decision == "relabel" else None, line)
                earlier = decided.get(source)
                if earlier is None:
                    decided[source] = found
                elif (earlier.decision, earlier.label) != (found.decision, found.label):
                    problems.append(
                        f"{where}: {source!r} already decided on line {earlier.line} "
                        f"({_decision_text(earlier)}); this line says {_decision_text(found)}"
                    )
        except csv.Error as error:
            raise DecisionsError([f"{shown} line {reader.line_num}: not valid CSV ({error})"]) from None
        except UnicodeDecodeError:
            raise DecisionsError([f"{shown}: not UTF-8 text"]) from None
    if problems:
        raise DecisionsError(problems)
    return list(decided.values())


def _decision_text(decision: Decision) -> str:
    return f"relabel as {decision.label!r}" if decision.decision == "relabel" else decision.decision


def _listed(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
