"""Writing and rendering a run folder: Parquet + JSON files and the HTML report.

Modules:

- ``parquet``: the atomic writers, the column descriptions and the reader (:func:`load_run`).
- ``html``: renders ``report.html`` from a run folder's files alone; ``gallery``: its flagged examples, paged in the page.
- ``plots``: the page's plots (difficulty histogram, convergence history), written directly as inline SVG.
- ``formatting``: number formats (the page's jinja filters) and the flag order, shared by ``html`` and ``plots``.
"""

from .html import build_report_html, render_report
from .parquet import (
    EXAMPLES_DESCRIPTIONS,
    GALLERY_DESCRIPTIONS,
    SET_ASIDE_DESCRIPTIONS,
    RunFiles,
    atomic_write_bytes,
    atomic_write_text,
    load_run,
    read_metadata,
    write_json_atomic,
    write_parquet_atomic,
)

__all__ = [
    "EXAMPLES_DESCRIPTIONS",
    "GALLERY_DESCRIPTIONS",
    "SET_ASIDE_DESCRIPTIONS",
    "RunFiles",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_report_html",
    "load_run",
    "read_metadata",
    "render_report",
    "write_json_atomic",
    "write_parquet_atomic",
]
