"""The :func:`clean` function: the automatic rules, the per-example trail and the provenance record.

See the package docstring (:mod:`minnorm_audit.clean`) for the files it writes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import __version__
from ..audit import CHECKPOINT_FILE
from ..report.parquet import REPORT_FILE, RUN_FILES, load_run
from .decisions import CleanError, Decision, read_decisions
from .output import (
    _check_outputs,
    _cleaned_dataset,
    _input_description,
    _output_paths,
    _rerun_command,
    _write,
)

if TYPE_CHECKING:
    from ..audit import AuditResult

__all__ = ["ACTIONS", "RULES", "RULE_DESCRIPTIONS", "CleanResult", "clean"]

RULES = ("drop-mislabeled", "drop-flagged", "drop-outliers", "relabel-mislabeled", "drop-duplicates", "none")
ACTIONS = ("kept", "dropped", "relabeled")
RULE_DESCRIPTIONS = {
    "drop-mislabeled": "drop examples flagged mislabeled",
    "drop-flagged": "drop examples flagged mislabeled, hard or outlier (every flagged example)",
    "drop-outliers": "drop examples flagged outlier",
    "relabel-mislabeled": "relabel examples flagged mislabeled to their suggested label",
    "drop-duplicates": ("keep one example per group of exact or near copies (duplicate_group), preferring the "
                        "train split, then the label the group's evidence supports, then the first; drop the rest"),
    "none": "keep every example a reviewer did not decide on",
}
_EXAMPLE_COLUMNS = ("source", "given_label", "suggested_label", "given_target", "flag", "difficulty",
                    # drop-duplicates
                    "example_id", "split", "duplicate_group", "duplicate_verdict")


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
    rule : {"drop-mislabeled", "drop-flagged", "drop-outliers", "relabel-mislabeled", "drop-duplicates", "none"}, default="drop-mislabeled"
        What happens to examples no reviewer decided on: drop those flagged
        ``mislabeled``; drop every flagged example (``mislabeled``, ``hard`` and
        ``outlier``); drop ``outlier`` ones; relabel ``mislabeled`` ones to their
        suggested label; or keep everything (apply the decisions only).
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
        # The audit's verdict: when it was inconclusive the rule acted on flags that are
        # not to be trusted (the CLI says so on stderr).
        "audit_inconclusive": (files.summary.get("inconclusive") or {}).get("reason"),
        "decisions": decisions_record,
        "counts": counts,
        "manifest": str(paths["manifest"].resolve()),
        "trail": str(paths["trail"].resolve()),
        "rerun_command": _rerun_command(paths["manifest"], source_input, regression),
    }
    _write(paths, manifest, trail, provenance, source_input)
    return CleanResult(manifest=manifest, trail=trail, provenance=provenance, paths=paths)


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
    copy_notes = _duplicate_drops(examples) if rule == "drop-duplicates" else {}
    notes: list[str | None] = []
    for source, flag, old_label, suggestion in zip(sources, flags, old_labels, suggested):
        decision = chosen.get(source)
        if decision is not None:
            by, line = "reviewer", decision.line
            verb, new_label = decision.decision, decision.label
        elif rule == "drop-duplicates":
            by, line, new_label = "rule", None, None
            verb = "drop" if copy_notes.get(source, (False,))[0] else "keep"
        else:
            by, line = "rule", None
            verb, new_label = _rule_decision(rule, flag, suggestion)
        notes.append(copy_notes[source][1] if source in copy_notes and decision is None else None)
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
            "note": pd.array(notes, dtype="string"),
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


def _duplicate_drops(examples: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """drop-duplicates: {source: (dropped, note)} for every member of a duplicate group.
    The copy kept is in the train split when one is (the other splits keep their
    examples unseen in training), then carries the label the group's evidence supports
    (verdict agree or supported, not mislabeled or conflicting), then comes first."""
    if "duplicate_group" not in examples.columns:
        raise CleanError("rule 'drop-duplicates' needs a run with the duplicate columns (audit it again)")
    members = examples[examples["duplicate_group"].notna()]
    notes: dict[str, tuple[bool, str]] = {}
    for _, group in members.groupby("duplicate_group", sort=True):
        split = group["split"].astype(str).str.lower() if "split" in group.columns else None
        verdict = group["duplicate_verdict"].fillna("").astype(str)
        rank = pd.DataFrame({
            "not_train": ~split.isin(("train", "training")) if split is not None else False,
            "not_supported": ~verdict.isin(("agree", "supported")),
            "id": group["example_id"].astype(int),
        }, index=group.index).sort_values(["not_train", "not_supported", "id"])
        kept = group.loc[rank.index[0]]
        why = [reason for reason, applies in (
            ("train split", split is not None and not rank.iloc[0]["not_train"]),
            ("the label the evidence supports", not rank.iloc[0]["not_supported"]),
        ) if applies] or ["first of the group"]
        for index, row in group.iterrows():
            if index == rank.index[0]:
                notes[str(row["source"])] = (False, f"kept for duplicate group {int(row['duplicate_group'])} "
                                                    f"({', '.join(why)})")
            else:
                notes[str(row["source"])] = (True, f"copy of {kept['source']}, kept ({', '.join(why)})")
    return notes


def _rule_decision(rule: str, flag: str, suggestion: Any) -> tuple[str, Any]:
    if rule == "drop-mislabeled" and flag == "mislabeled":
        return "drop", None
    if rule == "drop-flagged" and flag in ("mislabeled", "hard", "outlier"):
        return "drop", None
    if rule == "drop-outliers" and flag == "outlier":
        return "drop", None
    if rule == "relabel-mislabeled" and flag == "mislabeled":
        return "relabel", suggestion
    return "keep", None
