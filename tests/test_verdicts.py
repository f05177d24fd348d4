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
    MIN_FALLBACK_BIC_EVIDENCE,
    calibrated_flags,
    core_distances,
    count_then_rank,
    error_groups,
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
    # A flipped label is a real example of another class, never an outlier.
    assert (examples["flag"].to_numpy()[flipped] == "outlier").mean() <= 0.05
    assert result.summary["flag_rule"]["expected_errors_among_flagged"] == pytest.approx(called.sum(), rel=0.15)


@pytest.mark.slow
def test_flips_a_wide_network_memorizes_are_still_flagged(tmp_path):
    """The digits as 784 raw pixels (upsampled to 28 x 28, a little pixel noise): the
    MLP fits a good share of the flipped labels by the end. The count and the ranking
    come from the training-averaged evidence, so those flips are flagged as well."""
    import torch

    images, labels = load_bundled_digits()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.nn.functional.interpolate(torch.as_tensor(images, dtype=torch.float32)[:, None] / 16, size=(28, 28),
                                             mode="bilinear", align_corners=False)
    pixels = (pixels + 0.05 * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)
    features = pixels.reshape(len(labels), -1).numpy()
    rng = np.random.default_rng(2)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=len(labels) // 5, replace=False)] = True
    given = labels.copy()
    given[flipped] = (labels[flipped] + rng.integers(1, 10, size=flipped.sum())) % 10
    result = minnorm_audit.audit((features, given), out=tmp_path / "run", device="cpu", gallery_size=0)
    examples = result.examples
    called = (examples["flag"] == "mislabeled").to_numpy()
    memorized = flipped & (examples["margin"].to_numpy() > 0)
    assert memorized.sum() >= 0.2 * flipped.sum(), memorized.sum()
    assert called[memorized].mean() >= 0.75, called[memorized].mean()
    precision, recall = (called & flipped).sum() / called.sum(), (called & flipped).sum() / flipped.sum()
    assert precision >= 0.85 and recall >= 0.8, (precision, recall)


def test_overlapping_classes_without_flips_get_few_mislabeled(tmp_path):
    """Four classes that overlap heavily (the network fits about 73% of the correct
    labels): a continuum of ambiguous examples, not a group of errors. One class is
    bimodal (a blob of it sits inside another class's region) but that group is most
    of the class, so it is not counted as errors. What is called mislabeled is only the
    natural tail the network contradicted by a full margin, in classes that are not one
    group (3.0% here). Narrow tables are compared by Euclidean distance for outliers:
    by angle, 7.2% of these rows were called outlier (rows near the mean have no stable
    direction); by distance 1.7%."""
    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 1.0, size=(4, 2, 6))
    labels = rng.integers(0, 4, size=2000)
    features = (centres[labels, rng.integers(0, 2, size=2000)] + rng.normal(size=(2000, 6))).astype(np.float32)
    result = minnorm_audit.audit((features, labels), out=tmp_path / "run", device="cpu", gallery_size=0)
    assert result.summary["inconclusive"] is None and result.summary["fit"]["train_accuracy"] < 0.9
    assert result.summary["counts"]["mislabeled"] <= 0.05 * len(labels)
    assert result.summary["counts"]["outlier"] <= 0.04 * len(labels)
    assert not any(group["error_group"] for group in result.summary["flag_rule"]["class_thresholds"])


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory) -> tuple[minnorm_audit.AuditResult, np.ndarray, Path]:
    """The digits as a CSV table with 40 rows of alike junk appended (random labels):
    one noise pattern with a little jitter, so the junk rows are each other's nearest
    neighbours."""
    features, labels = digits_table()
    rng = np.random.default_rng(1)
    pattern = rng.uniform(0, 16, size=features.shape[1])
    noise = np.clip(pattern + rng.normal(0, 1.0, size=(40, features.shape[1])), 0, 16).astype(np.float32)
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
    assert rule["outlier_checked"] and len(rule["class_thresholds"]) == 10
    assert rule["expected_errors_among_flagged"] <= summary["counts"]["mislabeled"]
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


def test_error_groups_count_a_shifted_group_and_leave_a_skewed_clean_class_alone():
    """Class 0: 10% of its labels wrong, their difficulty shifted up by the contradiction;
    class 1: no errors, but a long upper tail (right-skewed, as a CNN's clean examples
    are). The count is the wrong labels', within sampling error, and the skewed class
    gets none."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 1000)
    wrong = (labels == 0) & (np.arange(2000) < 100)
    difficulty = np.where(labels == 0, rng.normal(0.2, 0.35, 2000), rng.gamma(2.0, 0.3, 2000) - 0.3)
    difficulty[wrong] = rng.normal(2.0, 0.35, 100)
    posterior, groups, _ = error_groups(difficulty, labels, 2, margin=1.0)
    assert groups[0]["error_group"] and abs(groups[0]["expected_errors"] - 100) <= 8
    assert groups[1]["expected_errors"] <= 10
    suggested = np.where(labels == 0, 1, 0)
    flags, rule = calibrated_flags(difficulty, labels, 2, 1.0, suggested=suggested)
    called = flags == "mislabeled"
    assert (called & wrong).sum() >= 92 and (called & ~wrong).sum() <= 10
    assert abs(rule["expected_errors_among_flagged"] - called.sum()) <= 0.1 * called.sum()


def test_error_groups_need_a_group_that_prefers_another_class():
    """Two groups the BIC can tell apart, but the upper one still fits its label on
    average (mean difficulty below the margin): those are easy and less easy correct
    examples, not errors."""
    rng = np.random.default_rng(1)
    labels = np.zeros(1000, dtype=np.int64)
    difficulty = np.concatenate([rng.normal(-1.5, 0.2, 700), rng.normal(0.0, 0.2, 300)])
    posterior, groups, _ = error_groups(difficulty, labels, 1, margin=1.0)
    assert groups[0]["bic_two_groups"] < groups[0]["bic_one_group"]
    assert not groups[0]["error_group"] and posterior.sum() == 0


def test_fallback_flags_contradicted_examples_only_where_the_class_is_not_one_group():
    """Classes without an error group. Class 0 is one Gaussian group whose upper tail
    the network contradicted by a full margin (overlap): one group explains it, nothing
    is flagged. Class 1 is too small for a mixture: its contradicted example is flagged.
    Class 2 holds two groups (BIC by far) whose upper one is most of the class, so it
    is no error group, and its contradicted examples are flagged."""
    rng = np.random.default_rng(2)
    labels = np.concatenate([np.zeros(1000, int), np.ones(5, int), np.full(1000, 2)])
    difficulty = np.concatenate([rng.normal(0.3, 0.8, 1000), [3.0, 0.1, 0.2, 0.0, -0.1],
                                 rng.normal(0.0, 0.3, 400), rng.normal(2.2, 0.3, 600)])
    suggested = np.where(labels == 0, 1, 0)
    flags, rule = calibrated_flags(difficulty, labels, 3, 1.0, suggested=suggested)
    groups = rule["class_groups"]
    contradicted = difficulty >= 2.0
    assert ((labels == 0) & contradicted).sum() >= 10
    assert not groups[0]["error_group"] and not groups[0]["fallback"]
    assert groups[0]["bic_one_group"] - groups[0]["bic_two_groups"] < MIN_FALLBACK_BIC_EVIDENCE
    assert not (flags[labels == 0] == "mislabeled").any()
    assert groups[1]["fallback"] and flags[1000] == "mislabeled" and (flags[1001:1005] != "mislabeled").all()
    assert not groups[2]["error_group"] and groups[2]["fallback"] and groups[2]["error_group_weight"] > 0.5
    assert ((flags == "mislabeled") == (contradicted & (labels == 2)) | (np.arange(len(labels)) == 1000)).all()


def test_count_then_rank_flags_the_top_of_each_pair():
    difficulty = np.array([3.0, 2.0, 1.0, 0.5, 2.5, 1.5, 0.1])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    suggested = np.array([1, 1, 2, 2, 0, 0, 1])
    posterior = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.0])
    # Pair (0, 1): 0.9 + 0.8 -> 2 flagged; (0, 2): 0.6 + 0.3 -> 1, the harder one;
    # (1, 0): 0.7 + 0.2 -> 1; the example with no posterior never.
    flagged = count_then_rank(posterior, difficulty, labels, suggested)
    assert flagged.tolist() == [True, True, True, False, True, False, False]


def test_calibrated_flags_hard_uses_each_class_own_spread():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    # Class 1 is fitted less tightly: its ordinary spread must not read as hard.
    difficulty = np.where(labels == 0, rng.normal(-0.2, 0.1, 400), rng.normal(0.2, 0.4, 400))
    difficulty[[1, 201]] = [0.6, 1.0]  # 8 (class 0) and 2 (class 1) spreads up
    flags, rule = calibrated_flags(difficulty, labels, 2, 1.0, suggested=1 - labels)
    assert flags[1] == "hard" and flags[201] == "ok"
    assert (flags != "mislabeled").all()
    assert (flags == "hard").sum() <= 8
    assert rule["class_scales"][1] > 3 * rule["class_scales"][0]


@pytest.mark.parametrize("geometry", ["cosine", "euclidean"])
def test_core_distances_against_a_brute_force_count(geometry):
    """Core: the rows most of whose k nearest rows carry their label; every row's mean
    chord distance to its k nearest core rows, a core row never its own neighbour: the
    brute force with the sample's column statistics (spreads floored at a tenth of
    their median)."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(120, 5)) + np.repeat(rng.normal(size=(3, 5)) * 3, 40, axis=0)
    features[:, 4] *= 1e-3  # a nearly constant column: its spread is floored
    labels = np.repeat([0, 1, 2], 40)
    labels[::10] = (labels[::10] + 1) % 3  # 12 rows among another class's rows
    got, core, agreeing = core_distances(features, labels, neighbours=4, reference_rows=10_000, block_elements=64,
                                         geometry=geometry)
    std = features.std(0)
    std = np.maximum(std, 0.1 * np.median(std))
    unit = (features - features.mean(0)) / std
    if geometry == "cosine":
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    chord = np.linalg.norm(unit[:, None, :] - unit[None, :, :], axis=2)
    np.fill_diagonal(chord, np.inf)  # the self-exclusion branch
    agreement = (labels[np.argsort(chord, axis=1)[:, :4]] == labels[:, None]).mean(1)
    np.testing.assert_array_equal(core, agreement > 0.5)
    np.testing.assert_array_equal(agreeing, agreement > 0.5)
    assert not core[::10].any() and core.sum() >= 100
    to_core = chord[:, core]
    expected = np.sort(to_core, axis=1)[:, :4].mean(1)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_a_cluster_of_alike_junk_is_far_from_the_core_and_flagged_outlier():
    """30 near-identical junk rows with random labels: each other's nearest neighbours,
    but not in the core (their neighbours disagree with their labels), so all are
    outliers; no real row is."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 20))
    data = rng.normal(size=(600, 3)) @ basis + 0.05 * rng.normal(size=(600, 20))
    labels = np.concatenate([np.digitize(data[:, 0], np.quantile(data[:, 0], [0.25, 0.5, 0.75])), rng.integers(0, 4, 30)])
    junk = rng.normal(size=20) * 3 + 0.01 * rng.normal(size=(30, 20))
    features = np.concatenate([data, junk])
    difficulty = np.concatenate([rng.normal(0.0, 0.3, 600), rng.normal(1.0, 0.3, 30)])
    distance, core, agreeing = core_distances(features, labels)
    # Random labels among 4 classes agree with most of 10 neighbours by chance at most
    # now and then.
    assert core[600:].mean() <= 0.2
    flags, _ = calibrated_flags(difficulty, labels, 4, 1.0, suggested=(labels + 1) % 4, distance=distance, core=core,
                                agreeing=agreeing)
    assert (flags[600:] == "outlier").mean() >= 0.9
    # Rows between two classes are not core rows themselves, so a few sit farther from
    # the core than core rows do.
    assert (flags[:600] == "outlier").mean() <= 0.05

