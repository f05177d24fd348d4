"""Verdicts people can trust: the calibrated flag rule on real training runs (clean data
gets few flags, flipped labels are found, noise rows are outliers), the inconclusive
verdict of a network that has not learned the data, and the outlier flag everywhere it
shows (summary.json, examples.parquet, the page, clean)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import minnorm_audit
from minnorm_audit.report.formatting import format_number, format_percent
from minnorm_audit.calibration import (
    calibrated_flags,
    neighbour_distances,
    training_verdict,
)
from minnorm_audit.cli import EXIT_INCONCLUSIVE, main
from minnorm_audit.data import load_bundled_digits
from minnorm_audit.scoring import FLAGS


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_bundled_digits()
    return images.reshape(len(images), -1).astype(np.float32), labels.astype(np.int64)


# --------------------------------------------------------------------------- the rule on real runs


@pytest.mark.slow
def test_clean_digits_get_few_flags(tmp_path):
    features, labels = digits_table()
    result = minnorm_audit.audit((features, labels), out=tmp_path / "run", device="cpu", gallery_size=0)
    counts, total = result.summary["counts"], len(labels)
    assert set(counts) == set(FLAGS)
    # Otsu's split called 0.9% of these mislabeled and 28% hard.
    assert counts["mislabeled"] <= 0.02 * total
    assert counts["hard"] + counts["outlier"] <= 0.06 * total
    assert result.summary["inconclusive"] is None


@pytest.mark.slow
def test_digits_with_ten_percent_flips_are_found_with_precision_and_recall(tmp_path):
    features, labels = digits_table()
    rng = np.random.default_rng(0)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=len(labels) // 10, replace=False)] = True
    given = labels.copy()
    given[flipped] = (labels[flipped] + rng.integers(1, 10, size=flipped.sum())) % 10
    result = minnorm_audit.audit((features, given), out=tmp_path / "run", device="cpu", gallery_size=0)
    examples = result.examples
    called = (examples["flag"] == "mislabeled").to_numpy()
    precision = (called & flipped).sum() / called.sum()
    recall = (called & flipped).sum() / flipped.sum()
    assert precision >= 0.85 and recall >= 0.9, (precision, recall)
    # The suggested label is the original one for nearly every caught flip.
    suggested = examples["suggested_label"].astype(int).to_numpy()
    assert (suggested[called & flipped] == labels[called & flipped]).mean() >= 0.9


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory) -> tuple[minnorm_audit.AuditResult, np.ndarray, Path]:
    """The digits as a CSV table with 40 rows of pixel noise appended (random labels)."""
    features, labels = digits_table()
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 16, size=(40, features.shape[1])).astype(np.float32)
    table = pd.DataFrame(np.concatenate([features, noise]), columns=[f"p{i}" for i in range(features.shape[1])])
    table["label"] = np.concatenate([labels, rng.integers(0, 10, size=40)])
    folder = tmp_path_factory.mktemp("noise")
    path = folder / "digits.csv"
    table.to_csv(path, index=False)
    result = minnorm_audit.audit(path, out=folder / "run", device="cpu", gallery_size=20)
    is_noise = np.arange(len(table)) >= len(labels)
    return result, is_noise, folder


@pytest.mark.slow
def test_planted_noise_rows_are_outliers(noise_run):
    result, is_noise, _ = noise_run
    flag = result.examples["flag"].to_numpy()
    # examples.parquet keeps the table's row numbers in "source".
    noise = is_noise[result.examples["source"].astype(int).to_numpy()]
    assert (flag[noise] == "outlier").mean() >= 0.6
    assert (flag[~noise] == "outlier").mean() <= 0.04
    assert (flag[noise] == "mislabeled").mean() <= 0.15


@pytest.mark.slow
def test_outliers_in_summary_table_page_and_clean(noise_run, tmp_path):
    result, _, _ = noise_run
    run_dir = result.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    outliers = int((result.examples["flag"] == "outlier").sum())
    assert summary["counts"]["outlier"] == outliers > 0
    assert sum(row["outlier"] for row in summary["per_class"]) == outliers
    rule = summary["flag_rule"]
    assert rule["outlier_checked"] and rule["mislabeled_z"] > 0 and len(rule["class_thresholds"]) == 10
    assert "outlier_from_distance" in rule["class_thresholds"][0] and "outlier" in rule["rule"]
    # The table's field description names the new value.
    description = pq.read_schema(run_dir / "examples.parquet").field("flag").metadata[b"description"].decode()
    assert "'outlier'" in description
    # The page: a headline card and a section of their own.
    page = (run_dir / "report.html").read_text()
    assert f'data-count="outlier">{outliers}<' in page
    section = page[page.index('id="outliers"'):page.index('id="set-aside"')]
    assert section.count('<article class="item outlier"') == min(outliers, 20)
    gallery = page[page.index('id="gallery"'):page.index('id="outliers"')]
    assert 'class="item outlier"' not in gallery
    # "How to read" states the cap this run trained with and the share of examples at it.
    cap, share = summary["diagnostics"]["max_multiplier"], summary["diagnostics"]["fraction_at_cap"]
    assert 0 < cap < 1 and 0 < share < 1
    assert f"C = {format_number(cap)}" in page and f"{format_percent(share)} of the examples" in page
    # clean: drop-outliers drops exactly the outliers, drop-flagged every flagged example.
    cleaned = minnorm_audit.clean(run_dir, tmp_path / "no-outliers.csv", rule="drop-outliers")
    dropped = set(cleaned.trail.loc[cleaned.trail["action"] == "dropped", "source"])
    assert dropped == set(result.examples.loc[result.examples["flag"] == "outlier", "source"])
    cleaned = minnorm_audit.clean(run_dir, tmp_path / "unflagged.csv", rule="drop-flagged")
    assert cleaned.counts["dropped"] == int((result.examples["flag"] != "ok").sum())
    assert cleaned.provenance["audit_inconclusive"] is None


def test_clean_cli_offers_drop_outliers():
    assert "drop-outliers" in CliRunner().invoke(main, ["clean", "-h"]).output


# --------------------------------------------------------------------------- inconclusive


def test_undertrained_run_is_inconclusive_and_the_gate_exits_4(tmp_path):
    images, labels = load_bundled_digits()
    root = tmp_path / "digits"
    for index in range(200):
        folder = root / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[index] * 15).astype(np.uint8)).save(folder / f"{index:04d}.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(root), "--out", str(out), "--epochs", "2", "--image-size", "16",
                                       "--device", "cpu", "--fail-on-flagged", "0.5"])
    assert result.exit_code == EXIT_INCONCLUSIVE == 4, result.output
    summary = json.loads((out / "summary.json").read_text())
    reason = summary["inconclusive"]["reason"]
    assert "has not learned" in reason and summary["inconclusive"]["training_accuracy"] < 0.5
    last_lines = result.output.strip().splitlines()[-2:]
    assert any("inconclusive" in line for line in last_lines)
    page = (out / "report.html").read_text()
    assert 'id="inconclusive"' in page and "do not act on these flags" in page
    # Without the gate the run exits 0, and its last line still says why not to trust it.
    again = CliRunner().invoke(main, ["run", str(root), "--out", str(tmp_path / "again"), "--epochs", "2",
                                      "--image-size", "16", "--device", "cpu"])
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1].startswith("audit inconclusive:")


def test_training_verdict_thresholds():
    assert training_verdict(0.95, 0.94, 10) is None
    assert "has not learned" in training_verdict(0.3, 0.3, 10)
    # Two classes: a network that predicts the larger class for everything.
    assert "near chance" in training_verdict(0.9, 0.5, 2)
    assert training_verdict(0.8, 0.76, 2) is None


# --------------------------------------------------------------------------- the pure functions


def test_calibrated_flags_use_each_class_own_spread():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    # Class 1 is fitted less tightly: its ordinary spread must not read as hard.
    preference = np.where(labels == 0, rng.normal(-1.2, 0.1, 400), rng.normal(-0.8, 0.4, 400))
    competitor = preference.copy()
    violated = np.zeros(400, dtype=bool)
    preference[[0, 200]] = competitor[[0, 200]] = 0.9  # contradicted labels
    violated[[0, 200]] = True
    preference[[1, 201]] = competitor[[1, 201]] = [-0.4, 0.0]  # 8 (class 0) and 2 (class 1) spreads up
    competitor[201] = -0.1
    flags, rule = calibrated_flags(preference, competitor, violated, labels, 2)
    assert flags[0] == flags[200] == "mislabeled"
    assert flags[1] == "hard" and flags[201] == "ok"
    assert (np.delete(flags, [0, 1, 200, 201]) != "mislabeled").all()
    assert (flags == "hard").sum() <= 8
    assert rule["class_scales"][1] > 3 * rule["class_scales"][0]
    # No "mislabeled" without the end-of-training check.
    flags, _ = calibrated_flags(preference, competitor, np.zeros(400, dtype=bool), labels, 2)
    assert flags[0] != "mislabeled"


def test_neighbour_distances_single_out_rows_unlike_the_data():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 20))
    data = rng.normal(size=(500, 3)) @ basis + 0.05 * rng.normal(size=(500, 20))  # a 3-D subspace
    noise = rng.normal(size=(10, 20)) * data.std(0)
    distances = neighbour_distances(np.concatenate([data, noise]), reference_rows=300, block_elements=128 * 300)
    assert distances[500:].min() > np.quantile(distances[:500], 0.99)
    # The reference sample bounds memory; a row never counts itself.
    assert neighbour_distances(data[:2]).shape == (2,)
    assert np.isfinite(neighbour_distances(data, reference_rows=50)).all()


def test_mislabeled_null_comes_from_the_fitted_examples():
    """30% of a class flipped: measured against every example of the class, the flips
    inflate its spread and hide themselves; against the examples the network fits,
    every flip stands out and no correct label is called mislabeled."""
    rng = np.random.default_rng(1)
    labels = np.zeros(1000, dtype=np.int64)
    flipped = np.arange(1000) < 300
    preference = np.where(flipped, rng.normal(0.9, 0.2, 1000), rng.normal(-1.0, 0.3, 1000))
    competitor = preference.copy()
    fitted = ~flipped  # the network predicts the given label for the correct ones only
    violated = flipped.copy()
    flags, rule = calibrated_flags(preference, competitor, violated, labels, 1, fitted=fitted)
    assert (flags[flipped] == "mislabeled").all()
    assert (flags[~flipped] != "mislabeled").all()
    assert abs(rule["mislabeled_scales"][0] - 0.3) < 0.05 and abs(rule["mislabeled_medians"][0] + 1.0) < 0.05
    # Without the fitted examples the null is every example: most flips are missed.
    flags_all, rule_all = calibrated_flags(preference, competitor, violated, labels, 1)
    assert (flags_all[flipped] == "mislabeled").mean() < 0.5
    assert rule_all["class_scales"][0] > 1.5 * rule["mislabeled_scales"][0]


def test_neighbour_distances_against_a_brute_force_count():
    """Per-class neighbours equal the brute force: standardize with the reference
    sample's statistics, cosine geometry, the k nearest reference rows of the class a
    row is measured against, never itself."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(120, 5)) + np.repeat(rng.normal(size=(3, 5)) * 3, 40, axis=0)
    labels = np.repeat([0, 1, 2], 40)
    against = (labels + 1) % 3
    got = neighbour_distances(features, labels, against, neighbours=4, reference_rows=10_000, block_elements=64)
    # Every row is in the reference sample here (the quota exceeds each class).
    unit = (features - features.mean(0)) / features.std(0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    chord = np.sqrt(np.clip(2 - 2 * unit @ unit.T, 0, None))
    np.fill_diagonal(chord, np.inf)
    expected = [np.sort(chord[i, labels == against[i]])[:4].mean() for i in range(120)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
