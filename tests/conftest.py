"""Shared, seeded fixtures for the test suite.

The report's tests read run folders written by the real writer: small real audits
(``minnorm_audit.audit``), each trained once per session on first use and copied into
a fresh folder for every test that asks, so a test that changes its folder changes
nobody else's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

# --------------------------------------------------------------------------- report: real run folders

HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
QUOTES_CLASS = "\"&'<>"
REPORT_CLASSES = ["cat", "dog", HOSTILE_CLASS, QUOTES_CLASS, "bird"]
# A file name with markup in it (a path cannot hold "/", so no closing tag).
SCRIPT_SOURCE = "dog/<script>alert(2).png"
# The image run: per class this many images, two of them filed under the next class
# (real flips), and BROKEN_FILES unreadable files spread over the classes: more than
# the page's 200-row set-aside table shows, fewer than half of all files (the loader
# stops on a mostly broken dataset).
IMAGES_PER_CLASS = 40
BROKEN_FILES = 205
# The table run: three well-separated classes and a small fourth drawn from the first
# one's distribution, which the network cannot tell apart from it (not learned).
TABLE_PER_CLASS = 90
NOT_LEARNED_CLASS = "d"
NOT_LEARNED_SIZE = 12


def _colour_images(root: Path) -> dict[str, str]:
    """Colour-coded 8x8 PNGs per class in ``root/<class>/``; returns {flipped source: true class}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (200, 200, 40), (40, 200, 200)]
    for name in REPORT_CLASSES:
        (root / name).mkdir(parents=True)
    flips = {}
    for position, (name, colour) in enumerate(zip(REPORT_CLASSES, colours)):
        for index in range(IMAGES_PER_CLASS):
            pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            folder = REPORT_CLASSES[(position + 1) % len(REPORT_CLASSES)] if index < 2 else name
            file_name = f"{position}-{index:03d}.png"
            if index < 2:
                flips[f"{folder}/{file_name}"] = name
            Image.fromarray(pixels).save(root / folder / file_name)
    # One more flip, whose file name is markup: a cat filed as a dog (flagged, so shown).
    Image.fromarray(np.full((8, 8, 3), colours[0], dtype=np.uint8)).save(root / SCRIPT_SOURCE)
    flips[SCRIPT_SOURCE] = REPORT_CLASSES[0]
    for index in range(BROKEN_FILES):
        (root / REPORT_CLASSES[index % len(REPORT_CLASSES)] / f"broken-{index:04d}.png").write_bytes(b"")
    return flips


def _table_frame(*, regression: bool = False, rows_per_class: int = TABLE_PER_CLASS) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    if regression:
        features = rng.normal(size=(4 * rows_per_class, 6))
        target = features @ rng.normal(size=6) + rng.normal(0, 0.1, len(features))
        target[:3] += 25.0  # three wrong targets
        frame = pd.DataFrame(features, columns=[f"feature_{j}" for j in range(5)] + ["<b>x</b>"])
        frame["label"] = target
        return frame
    centres = rng.normal(0, 4, (3, 6))
    parts, labels = [], []
    for k, name in enumerate("abc"):
        parts.append(centres[k] + rng.normal(0, 1, (rows_per_class, 6)))
        labels += [name] * rows_per_class
    parts.append(centres[0] + rng.normal(0, 1, (NOT_LEARNED_SIZE, 6)))
    labels += [NOT_LEARNED_CLASS] * NOT_LEARNED_SIZE
    frame = pd.DataFrame(np.vstack(parts), columns=[f"feature_{j}" for j in range(5)] + ["<b>x</b>"])
    frame["label"] = labels
    # Two flipped labels between the learned classes.
    frame.loc[[0, rows_per_class], "label"] = ["b", "c"]
    return frame


def _contents(folder: Path) -> dict[str, Any]:
    """What a run folder holds, read back: its frames, summary and metadata."""
    from minnorm_audit.report import read_metadata

    return {
        "examples": pd.read_parquet(folder / "examples.parquet"),
        "gallery": pd.read_parquet(folder / "gallery.parquet"),
        "set_aside": pd.read_parquet(folder / "set_aside.parquet"),
        "summary": json.loads((folder / "summary.json").read_text(encoding="utf-8")),
        "metadata": read_metadata(folder / "examples.parquet"),
    }


class RealRuns:
    """Real audits, each trained on first use (once per session): ``images`` (an image
    folder with flips, markup in class and file names, unreadable files, and the
    demo's figures added as ``minnorm-audit demo`` adds them), ``table`` (a table with
    a class the network does not learn), ``regression`` and ``quiet`` (nothing
    flagged)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[str, Path] = {}
        self.flips: dict[str, str] = {}

    def folder(self, kind: str) -> Path:
        if kind not in self.folders:
            self.folders[kind] = getattr(self, f"_{kind}")(self.root / kind)
        return self.folders[kind]

    def _images(self, base: Path) -> Path:
        import minnorm_audit
        from minnorm_audit.report import render_report, write_json_atomic

        self.flips = _colour_images(base / "photos")
        result = minnorm_audit.audit(base / "photos", out=base / "run", epochs=10, lr=0.01, batch_size=32,
                                     image_size=8, device="cpu", gallery_size=24)
        # As `minnorm-audit demo` does: its figures go into the summary, then the page.
        result.summary["demo"] = {"noise_rate": 0.05, "num_flipped": 10, "num_flagged_mislabeled": 12,
                                  "precision": 0.85, "recall": 0.8}
        write_json_atomic(result.run_dir / "summary.json", result.summary)
        render_report(result.run_dir)
        return result.run_dir

    def _table(self, base: Path) -> Path:
        import minnorm_audit

        base.mkdir(parents=True)
        _table_frame().to_csv(base / "table.csv", index=False)
        return minnorm_audit.audit(base / "table.csv", out=base / "run", device="cpu", epochs=20).run_dir

    def _regression(self, base: Path) -> Path:
        import minnorm_audit

        base.mkdir(parents=True)
        _table_frame(regression=True, rows_per_class=30).to_csv(base / "houses.csv", index=False)
        return minnorm_audit.audit(base / "houses.csv", out=base / "run", task="regression", device="cpu",
                                   epochs=10).run_dir

    def _quiet(self, base: Path) -> Path:
        import minnorm_audit

        base.mkdir(parents=True)
        rng = np.random.default_rng(2)
        frame = pd.DataFrame(rng.normal(size=(80, 3)), columns=["a", "b", "c"])
        frame["label"] = np.where(frame["a"] > 0, "pos", "neg")
        frame.to_csv(base / "quiet.csv", index=False)
        # A threshold no difficulty reaches: nothing is flagged.
        return minnorm_audit.audit(base / "quiet.csv", out=base / "run", device="cpu", epochs=2, threshold=1e9,
                                   gallery_size=0).run_dir


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return RealRuns(tmp_path_factory.mktemp("real-runs"))


@pytest.fixture(scope="session")
def make_run_folder(real_runs: RealRuns,
                    tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Factory: ``make_run_folder(name="run", kind="images")`` -> (folder, contents).

    A fresh copy of one of :class:`RealRuns`' run folders (``kind``: ``images``,
    ``table``, ``regression`` or ``quiet``) named ``name``, and what it holds
    (``examples``, ``gallery``, ``set_aside``, ``summary``, ``metadata``); with
    ``demo=False`` the demo's figures are taken out of the summary. Session-scoped so
    module-scoped fixtures can use it too.
    """
    from minnorm_audit.report import write_json_atomic

    def make(name: str = "run", kind: str = "images", *, demo: bool = True) -> tuple[Path, dict[str, Any]]:
        folder = tmp_path_factory.mktemp("runs") / name
        shutil.copytree(real_runs.folder(kind), folder)
        (folder / "report.html").unlink(missing_ok=True)
        if not demo:
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
            summary.pop("demo", None)
            write_json_atomic(folder / "summary.json", summary)
        return folder, _contents(folder)

    return make
