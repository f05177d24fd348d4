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

Modules:

- ``apply``: :func:`clean` itself, the automatic rules and the per-example trail.
- ``decisions``: the errors and reading a reviewer's decisions file (:class:`Decision`, :func:`read_decisions`).
- ``output``: the cleaned dataset's rows, the output paths and their checks, and the writers.
"""

from .apply import ACTIONS, RULE_DESCRIPTIONS, RULES, CleanResult, clean  # noqa: F401 - RULE_DESCRIPTIONS re-exported
from .decisions import DECISIONS, CleanError, Decision, DecisionsError, read_decisions
from .output import MANIFEST_DESCRIPTIONS, OUTPUT_SUFFIXES, TRAIL_DESCRIPTIONS  # noqa: F401 - re-exported

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
