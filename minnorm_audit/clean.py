"""From an audit to a cleaned dataset: rules, human decisions, and the exported manifest.

:func:`clean` reads a run folder and writes, outside the data, a new dataset file:

- ``FILE`` (``.csv`` or ``.parquet``), **the cleaned dataset**: one row per example
  that is kept or relabeled, dropped examples left out, so that a training pipeline
  (or ``minnorm-audit run``) reading it cannot pick a dropped example up by mistake.
  For an image folder or manifest run: columns ``path``, ``label``, ``source``,
  ``action`` (``kept`` or ``relabeled``) and ``old_label``, where ``path`` is
  relative to the audited data's root (the image folder, or the original
  manifest's folder): re-audit it with ``minnorm-audit run FILE --data-root ROOT``.
  For a table run: the table's own columns (features and label, new labels
  written in), so ``minnorm-audit run FILE`` re-audits it as it is. For data given in
  memory (a DataFrame, arrays, a torch Dataset): ``source`` (the position),
  ``label``, ``action``, ``old_label``, to index your data with.
- ``FILE``'s trail, ``<stem>.trail.<ext>``: **what was done to every example**, one
  row per audited or set-aside example: ``source``, ``action`` (``kept``,
  ``dropped``, ``relabeled``), ``label`` (the new one; empty when dropped),
  ``old_label``, ``decided_by`` (``reviewer``, ``rule`` or ``set aside``), the
  decisions file's line, and the audit's ``flag``, ``suggested_label`` and
  ``difficulty``.
- Provenance (run folder, rule, decisions file and its hash, counts, tool version,
  dataset fingerprint, the command that re-audits ``FILE``): in Parquet files under
  the schema metadata key ``minnorm_audit`` (``{"clean": {...}}``); beside a CSV as
  ``<stem>.provenance.json``.

Every file is written atomically. ``clean`` refuses to write inside the data folder,
over the original manifest or table, over the run folder's own files, or over the
decisions file; the original data is only ever read.

Human decisions (a CSV with ``source``, ``decision`` in keep / drop / relabel, and
``label`` for relabel, as the report page downloads it) come first; the automatic
rule applies where no decision was made. A source or class the run does not know is
an error naming the file and line, never skipped.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import __version__
from .audit import CHECKPOINT_FILE
from .report.parquet import (
    REPORT_FILE,
    RUN_FILES,
    atomic_write_bytes,
    load_run,
    write_json_atomic,
    write_parquet_atomic,
)

if TYPE_CHECKING:
    from .audit import AuditResult

__all__ = [
    "ACTIONS",
    "DECISIONS",
    "RULES",
    "CleanError",
    "CleanResult",
    "Decision",
    "DecisionsError",
    "clean",
    "read_decisions",
]

RULES = ("drop-mislabeled", "drop-flagged", "relabel-mislabeled", "none")
DECISIONS = ("keep", "drop", "relabel")
ACTIONS = ("kept", "dropped", "relabeled")
OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")
RULE_DESCRIPTIONS = {
    "drop-mislabeled": "drop examples flagged mislabeled",
    "drop-flagged": "drop examples flagged mislabeled or hard",
    "relabel-mislabeled": "relabel examples flagged mislabeled to their suggested label",
    "none": "keep every example a reviewer did not decide on",
}
_EXAMPLE_COLUMNS = ("source", "given_label", "suggested_label", "given_target", "flag", "difficulty")
_MAX_LISTED_PROBLEMS = 10

MANIFEST_DESCRIPTIONS = {
    "path": "Image path relative to the audited data's root (see provenance paths_relative_to).",
    "label": "The example's label after cleaning (the reviewer's or rule's new label when relabeled).",
    "source": "The example's source in the audit (examples.parquet): its path or its position.",
    "action": "What was done: 'kept' or 'relabeled' (dropped examples are only in the trail file).",
    "old_label": "The label the audited dataset gave the example.",
}
TRAIL_DESCRIPTIONS = {
    "source": "The example's source in the audit (examples.parquet / set_aside.parquet).",
    "action": "'kept', 'dropped' or 'relabeled'.",
    "label": "The label after cleaning; empty when dropped.",
    "old_label": "The label the audited dataset gave the example.",
    "decided_by": "'reviewer' (the decisions file), 'rule' (the automatic rule) or 'set aside' (unreadable in the run).",
    "decision_line": "Line of the decisions file the reviewer's decision came from; empty otherwise.",
    "flag": "The audit's flag: 'mislabeled', 'hard' or 'ok' (empty for set-aside items).",
    "suggested_label": "The audit's suggested label.",
    "difficulty": "The audit's difficulty (higher = more suspect).",
    "note": "Why a set-aside item was dropped (the run's reason).",
}


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


@dataclass
class CleanResult:
    """What :func:`clean` wrote.

    Attributes
    ----------
    manifest : DataFrame
        The cleaned dataset as written to the output file (kept and relabeled rows).
    trail : DataFrame
        One row per example (audited or set aside) with what was done and why.
    provenance : dict
        Run folder, rule, decisions, counts, tool version, re-audit command.
    paths : dict of str to Path
        ``manifest``, ``trail`` and, for CSV output, ``provenance``.
    """

    manifest: pd.DataFrame
    trail: pd.DataFrame
    provenance: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Examples ``kept``, ``dropped`` and ``relabeled`` (set-aside items count as dropped)."""
        return dict(self.provenance["counts"])

    @property
    def rerun_command(self) -> str | None:
        """The shell command that re-audits the cleaned file (None for in-memory data)."""
        return self.provenance.get("rerun_command")


# --------------------------------------------------------------------------- public API


def clean(
    run: AuditResult | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rule: str = "drop-mislabeled",
    decisions: str | os.PathLike[str] | None = None,
) -> CleanResult:
    """Write a cleaned copy of an audited dataset's manifest; the data itself is never touched.

    Parameters
    ----------
    run : str, Path or AuditResult
        The run folder written by ``minnorm-audit run`` / :func:`minnorm_audit.audit`.
    out : str or Path
        The cleaned dataset file, ``.csv`` or ``.parquet`` (see the module notes for
        its columns and the files written beside it). Must lie outside the data
        folder and must not be one of the run folder's files.
    rule : {"drop-mislabeled", "drop-flagged", "relabel-mislabeled", "none"}, default="drop-mislabeled"
        What happens to examples no reviewer decided on: drop those flagged
        ``mislabeled``; drop ``hard`` ones too; relabel ``mislabeled`` ones to
        their suggested label; or keep everything (apply the decisions only).
    decisions : str or Path, optional
        A reviewer's decisions (CSV: ``source``, ``decision``, ``label``), e.g.
        downloaded from ``report.html``. They override the rule.

    Returns
    -------
    CleanResult

    Raises
    ------
    DecisionsError
        The decisions file names an unknown source, decision or class (with its line).
    CleanError
        A bad output path, an unknown rule, a relabel rule on a regression run, or a
        table that changed since the audit.
    FileNotFoundError
        ``run`` is not a run folder.
    """
    run_dir = Path(getattr(run, "run_dir", run))
    if rule not in RULES:
        raise CleanError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    files = load_run(run_dir, example_columns=_EXAMPLE_COLUMNS)
    metadata = files.metadata
    regression = files.task == "regression"
    if regression and rule == "relabel-mislabeled":
        raise CleanError("rule 'relabel-mislabeled' needs a classification run; this run is a regression")
    source_input = _input_description(metadata, files.summary)
    out_path = Path(out).expanduser()
    paths = _output_paths(out_path)
    protected_files = [run_dir / name for name in (*RUN_FILES, REPORT_FILE, CHECKPOINT_FILE)]
    if decisions is not None:
        protected_files.append(Path(decisions))
    _check_outputs(list(paths.values()), source_input, protected_files)

    examples = files.examples
    class_names = [str(name) for name in metadata.get("class_names") or files.summary.get("class_names") or []]
    chosen: dict[str, Decision] = {}
    decisions_record = None
    if decisions is not None:
        chosen = {
            decision.source: decision
            for decision in read_decisions(
                decisions,
                sources=examples["source"].astype(str),
                class_names=class_names,
                set_aside=files.set_aside["source"].astype(str) if len(files.set_aside) else (),
                regression=regression,
            )
        }
        decisions_record = {
            "file": str(Path(decisions).resolve()),
            "sha256": hashlib.sha256(Path(decisions).read_bytes()).hexdigest(),
            "count": len(chosen),
        }

    trail = _trail(examples, files.set_aside, chosen, rule, regression)
    manifest = _cleaned_dataset(trail, source_input, metadata, regression)
    counts = {action: int((trail["action"] == action).sum()) for action in ACTIONS}
    counts.update(
        by_reviewer=int((trail["decided_by"] == "reviewer").sum()),
        by_rule=int(((trail["decided_by"] == "rule") & (trail["action"] != "kept")).sum()),
        set_aside=int((trail["decided_by"] == "set aside").sum()),
        rows_written=len(manifest),
    )
    provenance = {
        "tool": "minnorm-audit",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "data": files.summary.get("data", metadata.get("data")),
        "input": source_input,
        "task": files.task,
        "dataset_fingerprint": metadata.get("dataset_fingerprint"),
        "rule": rule,
        "rule_description": RULE_DESCRIPTIONS[rule],
        "decisions": decisions_record,
        "counts": counts,
        "manifest": str(paths["manifest"].resolve()),
        "trail": str(paths["trail"].resolve()),
        "rerun_command": _rerun_command(paths["manifest"], source_input, regression),
    }
    _write(paths, manifest, trail, provenance, source_input)
    return CleanResult(manifest=manifest, trail=trail, provenance=provenance, paths=paths)


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


# --------------------------------------------------------------------------- deciding


def _trail(
    examples: pd.DataFrame,
    set_aside: pd.DataFrame,
    chosen: Mapping[str, Decision],
    rule: str,
    regression: bool,
) -> pd.DataFrame:
    """One row per example: the reviewer's decision where there is one, else the rule's."""
    sources = examples["source"].astype(str).tolist()
    flags = examples["flag"].astype(str).tolist()
    if regression:
        old_labels: list[Any] = examples["given_target"].astype(float).tolist()
        suggested: list[Any] = [None] * len(sources)
    else:
        old_labels = examples["given_label"].astype(str).tolist()
        suggested = examples["suggested_label"].astype(str).tolist()
    actions, labels, decided_by, lines = [], [], [], []
    for source, flag, old_label, suggestion in zip(sources, flags, old_labels, suggested):
        decision = chosen.get(source)
        if decision is not None:
            by, line = "reviewer", decision.line
            verb, new_label = decision.decision, decision.label
        else:
            by, line = "rule", None
            verb, new_label = _rule_decision(rule, flag, suggestion)
        if verb == "drop":
            action, label = "dropped", None
        elif verb == "relabel" and new_label != old_label:
            action, label = "relabeled", new_label
        else:
            action, label = "kept", old_label
        actions.append(action)
        labels.append(label)
        decided_by.append(by)
        lines.append(line)
    label_type = "Float64" if regression else "string"
    trail = pd.DataFrame(
        {
            "source": pd.array(sources, dtype="string"),
            "action": pd.array(actions, dtype="string"),
            "label": pd.array(labels, dtype=label_type),
            "old_label": pd.array(old_labels, dtype=label_type),
            "decided_by": pd.array(decided_by, dtype="string"),
            "decision_line": pd.array(lines, dtype="Int64"),
            "flag": pd.array(flags, dtype="string"),
            "suggested_label": pd.array(suggested if not regression else [None] * len(sources), dtype="string"),
            "difficulty": examples["difficulty"].astype(float).to_numpy(),
            "note": pd.array([None] * len(sources), dtype="string"),
        }
    )
    if len(set_aside):
        dropped = pd.DataFrame(
            {
                "source": pd.array(set_aside["source"].astype(str).tolist(), dtype="string"),
                "action": pd.array(["dropped"] * len(set_aside), dtype="string"),
                "decided_by": pd.array(["set aside"] * len(set_aside), dtype="string"),
                "note": pd.array(set_aside["reason"].astype(str).tolist(), dtype="string"),
            }
        )
        trail = pd.concat([trail, dropped.reindex(columns=trail.columns).astype(trail.dtypes.to_dict())],
                          ignore_index=True)
    return trail


def _rule_decision(rule: str, flag: str, suggestion: Any) -> tuple[str, Any]:
    if rule == "drop-mislabeled" and flag == "mislabeled":
        return "drop", None
    if rule == "drop-flagged" and flag in ("mislabeled", "hard"):
        return "drop", None
    if rule == "relabel-mislabeled" and flag == "mislabeled":
        return "relabel", suggestion
    return "keep", None


# --------------------------------------------------------------------------- the cleaned dataset


def _input_description(metadata: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``input`` metadata; inferred (with the CLI's default columns) for runs
    written before it was recorded."""
    described = metadata.get("input")
    if isinstance(described, Mapping) and described.get("layout"):
        return dict(described)
    data = metadata.get("data") or summary.get("data")
    kind = metadata.get("kind") or summary.get("kind")
    if not data:
        raise CleanError("the run folder does not say which data it audited (no 'data' in its metadata)")
    data_path = Path(str(data))
    if data_path.is_dir():
        return {"layout": "images", "kind": "images", "path": str(data_path), "paths_relative_to": str(data_path)}
    if kind == "images":
        return {"layout": "manifest", "kind": "images", "path": str(data_path),
                "paths_relative_to": str(data_path.parent), "path_column": "path", "label_column": "label"}
    return {"layout": "table", "kind": "table", "path": str(data_path), "label_column": "label"}


def _cleaned_dataset(
    trail: pd.DataFrame, source_input: Mapping[str, Any], metadata: Mapping[str, Any], regression: bool
) -> pd.DataFrame:
    """The rows of the output file: the kept and relabeled examples, in audit order."""
    kept = trail[trail["action"].isin(["kept", "relabeled"]) & (trail["decided_by"] != "set aside")]
    layout = source_input["layout"]
    if layout == "table":
        return _cleaned_table(kept, source_input, metadata, regression)
    columns: dict[str, Any] = {}
    if layout in ("images", "manifest"):
        # The source is the path as the run read it, relative to paths_relative_to.
        columns["path"] = kept["source"].to_numpy()
    columns.update(
        label=kept["label"].to_numpy(),
        source=kept["source"].to_numpy(),
        action=kept["action"].to_numpy(),
        old_label=kept["old_label"].to_numpy(),
    )
    frame = pd.DataFrame(columns).reset_index(drop=True)
    return frame.astype({name: kept[name].dtype for name in ("label", "source", "action", "old_label")})


def _cleaned_table(
    kept: pd.DataFrame, source_input: Mapping[str, Any], metadata: Mapping[str, Any], regression: bool
) -> pd.DataFrame:
    """The audited table's rows that are kept, with the new labels written in.

    The table is loaded again exactly as the run loaded it and must give the run's
    dataset fingerprint: a table changed since the audit is refused.
    """
    from .data import DataError, _read_frame, load_dataset

    table_path = Path(source_input["path"])
    label_column = str(source_input.get("label_column") or "label")
    try:
        loaded = load_dataset(
            table_path,
            format="table",
            label_column=label_column,
            task="regression" if regression else "classification",
            feature_columns=source_input.get("feature_columns"),
        )
    except DataError as error:
        raise CleanError(f"cannot read the audited table again: {error}") from None
    if metadata.get("dataset_fingerprint") and loaded.fingerprint != metadata["dataset_fingerprint"]:
        raise CleanError(
            f"{table_path} changed since the audit (its dataset fingerprint differs); audit it again before cleaning"
        )
    frame = _read_frame(table_path, str(table_path))
    positions = kept["source"].astype(int).to_numpy()
    rows = frame.iloc[positions].reset_index(drop=True)
    relabeled = (kept["action"] == "relabeled").to_numpy()
    if relabeled.any():
        new_labels = kept["label"].astype(object).to_numpy()
        column = rows[label_column]
        if pd.api.types.is_integer_dtype(column.dtype) and all(_is_integer_text(label) for label in new_labels):
            values: Any = new_labels.astype(np.int64)
        else:
            rows[label_column] = column.astype(object)
            values = new_labels
        rows.loc[relabeled, label_column] = values[relabeled]
    return rows


def _is_integer_text(text: Any) -> bool:
    return re.fullmatch(r"[+-]?\d+", str(text).strip()) is not None


# --------------------------------------------------------------------------- writing


def _output_paths(out: Path) -> dict[str, Path]:
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CleanError(f"--out {out} must end in .csv or .parquet")
    if out.exists() and out.is_dir():
        raise CleanError(f"--out {out} is a folder; give a file name ending in .csv or .parquet")
    paths = {"manifest": out, "trail": out.with_name(f"{out.stem}.trail{out.suffix}")}
    if suffix == ".csv":
        paths["provenance"] = out.with_name(f"{out.stem}.provenance.json")
    return paths


def _check_outputs(outputs: list[Path], source_input: Mapping[str, Any], protected_files: list[Path]) -> None:
    """Refuse outputs inside the data folder, over the data file, over the run's files."""
    data_folders = []
    if source_input.get("layout") in ("images", "manifest") and source_input.get("paths_relative_to"):
        data_folders.append(Path(source_input["paths_relative_to"]).resolve())
    protected = {path.resolve() for path in protected_files}
    if source_input.get("path"):
        protected.add(Path(source_input["path"]).resolve())
    for output in outputs:
        resolved = output.resolve()
        for folder in data_folders:
            if resolved == folder or folder in resolved.parents:
                raise CleanError(f"refusing to write {output} inside the data folder {folder}; choose a path outside it")
        if resolved in protected:
            raise CleanError(f"refusing to write {output}: it would replace the run's or the data's own file {resolved}")


def _rerun_command(manifest: Path, source_input: Mapping[str, Any], regression: bool) -> str | None:
    layout = source_input["layout"]
    if layout not in ("images", "manifest", "table"):
        return None
    command = ["minnorm-audit", "run", str(manifest)]
    if layout in ("images", "manifest"):
        command += ["--data-root", str(source_input["paths_relative_to"])]
    else:
        label_column = str(source_input.get("label_column") or "label")
        if label_column != "label":
            command += ["--label-column", label_column]
    if regression:
        command += ["--task", "regression"]
    return shlex.join(command)


def _write(
    paths: Mapping[str, Path],
    manifest: pd.DataFrame,
    trail: pd.DataFrame,
    provenance: Mapping[str, Any],
    source_input: Mapping[str, Any],
) -> None:
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    if "provenance" in paths:  # CSV: no place for metadata inside the file
        _write_csv(paths["trail"], trail)
        _write_csv(paths["manifest"], manifest)
        write_json_atomic(paths["provenance"], provenance)
        return
    metadata = {"clean": provenance}
    write_parquet_atomic(paths["trail"], trail, descriptions=TRAIL_DESCRIPTIONS, metadata=metadata)
    descriptions = dict(MANIFEST_DESCRIPTIONS)
    if source_input["layout"] == "table":
        label_column = str(source_input.get("label_column") or "label")
        manifest = _numeric_features(manifest, label_column)
        descriptions = {
            str(name): ("The label after cleaning." if name == label_column else "Feature copied from the audited table.")
            for name in manifest.columns
        }
    write_parquet_atomic(paths["manifest"], manifest, descriptions=descriptions, metadata=metadata)


def _numeric_features(frame: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """A table read from CSV holds text; its feature columns go into Parquet as numbers."""
    frame = frame.copy()
    for name in frame.columns:
        if name != label_column and (frame[name].dtype == object or pd.api.types.is_string_dtype(frame[name])):
            try:
                frame[name] = pd.to_numeric(frame[name])
            except (ValueError, TypeError):
                pass  # left as text, which the table loader reads as it read the CSV
    return frame


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def _decision_text(decision: Decision) -> str:
    return f"relabel as {decision.label!r}" if decision.decision == "relabel" else decision.decision


def _listed(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
