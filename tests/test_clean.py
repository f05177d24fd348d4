"""`minnorm-audit clean` and minnorm_audit.clean: rules, reviewer decisions, the exported
manifest (re-audited end to end), provenance, and the data never being touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import minnorm_audit
from minnorm_audit.cli import main
from minnorm_audit.clean import DecisionsError, read_decisions
from minnorm_audit.data import DataError, load_dataset
from helpers import tree_hash

# Colour-coded 8x8 images: these settings catch every injected flip in ~2 s on a CPU.
# batch 128: the setting these fixtures were written for, from before the small-data rule.
FAST_IMAGES = {"epochs": 5, "lr": 0.01, "image_size": 8, "device": "cpu", "batch_size": 128}
FAST_IMAGES_CLI = ["--epochs", "5", "--lr", "0.01", "--batch-size", "128", "--image-size", "8", "--device", "cpu", "--quiet"]
COLOURS = {"bird": (40, 40, 200), "cat": (200, 40, 40), "dog": (40, 200, 40)}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def flipped_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """DATA/<class>/<file>.png, 14 per class, one file per class in the wrong folder,
    plus a zero-byte file (set aside). Returns (root, {flipped source: true class})."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data") / "photos"
    names = list(COLOURS)
    for name in names:
        (root / name).mkdir(parents=True)
    flips = {}
    for position, (name, colour) in enumerate(COLOURS.items()):
        for index in range(14):
            pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
            folder = name
            if index == 0:
                folder = names[(position + 1) % len(names)]
                flips[f"{folder}/{name}{index}.png"] = name
            Image.fromarray(pixels).save(root / folder / f"{name}{index}.png")
    (root / "cat" / "empty.png").write_bytes(b"")
    return root, flips


@pytest.fixture(scope="module")
def image_run(flipped_images, tmp_path_factory):
    root, flips = flipped_images
    before = tree_hash(root)
    result = minnorm_audit.audit(root, out=tmp_path_factory.mktemp("runs") / "photos", **FAST_IMAGES)
    assert tree_hash(root) == before
    mislabeled = result.examples[result.examples["flag"] == "mislabeled"]
    # The audit caught every injected flip and suggests the true class.
    assert set(flips) <= set(mislabeled["source"])
    suggested = dict(zip(mislabeled["source"], mislabeled["suggested_label"]))
    assert {source: suggested[source] for source in flips} == flips
    return result


def run_files_hash(run_dir: Path) -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in sorted(run_dir.iterdir()) if path.is_file())).hexdigest()


# --------------------------------------------------------------------------- rules and the exported files


def test_drop_mislabeled_writes_manifest_trail_and_provenance(image_run, flipped_images, tmp_path):
    root, flips = flipped_images
    data_before, run_before = tree_hash(root), run_files_hash(image_run.run_dir)
    out = tmp_path / "export" / "cleaned.csv"
    result = CliRunner().invoke(main, ["clean", str(image_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    examples = image_run.examples
    mislabeled = set(examples.loc[examples["flag"] == "mislabeled", "source"])

    manifest = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(manifest.columns) == ["path", "label", "source", "action", "old_label"]
    assert set(manifest["source"]) == set(examples["source"]) - mislabeled
    assert not set(flips) & set(manifest["source"])
    assert set(manifest["action"]) == {"kept"} and (manifest["label"] == manifest["old_label"]).all()
    assert (manifest["path"] == manifest["source"]).all()

    trail = pd.read_csv(out.with_name("cleaned.trail.csv"), dtype=str, keep_default_na=False)
    assert len(trail) == len(examples) + 1  # + the zero-byte file, set aside in the run
    dropped = trail[trail["action"] == "dropped"]
    assert set(dropped.loc[dropped["decided_by"] == "rule", "source"]) == mislabeled
    set_aside = dropped[dropped["decided_by"] == "set aside"]
    assert list(set_aside["source"]) == ["cat/empty.png"] and set_aside["note"].iloc[0] == "zero-byte file"

    provenance = json.loads(out.with_name("cleaned.provenance.json").read_text())
    assert provenance["run_dir"] == str(image_run.run_dir.resolve())
    assert provenance["rule"] == "drop-mislabeled" and provenance["version"] == minnorm_audit.__version__
    assert provenance["counts"]["dropped"] == len(mislabeled) + 1
    assert provenance["counts"]["kept"] == len(manifest) and provenance["counts"]["relabeled"] == 0
    assert provenance["dataset_fingerprint"] == image_run.summary["dataset_fingerprint"]
    assert f"--data-root {root}" in provenance["rerun_command"]
    assert "re-audit: minnorm-audit run" in result.output
    # Only read: the data and the run folder are exactly as they were.
    assert tree_hash(root) == data_before
    assert run_files_hash(image_run.run_dir) == run_before


def test_relabel_then_reaudit_the_cleaned_parquet(image_run, flipped_images, tmp_path):
    root, flips = flipped_images
    data_before = tree_hash(root)
    cleaned = minnorm_audit.clean(image_run, tmp_path / "cleaned.parquet", rule="relabel-mislabeled")
    manifest = pd.read_parquet(tmp_path / "cleaned.parquet")
    assert len(manifest) == len(image_run.examples)  # nothing dropped, set-aside item aside
    relabeled = manifest[manifest["action"] == "relabeled"]
    assert set(flips) <= set(relabeled["source"])
    labels = dict(zip(manifest["source"], manifest["label"]))
    assert {source: labels[source] for source in flips} == flips  # the true classes are back
    metadata = json.loads(pq.read_schema(tmp_path / "cleaned.parquet").metadata[b"minnorm_audit"])
    assert metadata["clean"]["rule"] == "relabel-mislabeled"
    assert metadata["clean"]["counts"]["relabeled"] == len(relabeled) == cleaned.counts["relabeled"]

    # The cleaned manifest is itself an input for `run` (paths relative to the data root).
    out = tmp_path / "reaudit"
    result = CliRunner().invoke(
        main, ["run", str(tmp_path / "cleaned.parquet"), "--data-root", str(root), "--out", str(out), *FAST_IMAGES_CLI]
    )
    assert result.exit_code == 0, result.output
    reaudited = pd.read_parquet(out / "examples.parquet")
    assert sorted(reaudited["source"]) == sorted(manifest["path"])
    assert dict(zip(reaudited["source"], reaudited["given_label"])) == labels
    still_suspect = set(reaudited.loc[reaudited["flag"] == "mislabeled", "source"])
    assert not still_suspect & set(flips)
    assert tree_hash(root) == data_before


def test_decisions_come_first_and_the_rule_fills_in(image_run, flipped_images, tmp_path):
    root, flips = flipped_images
    examples = image_run.examples
    ok = examples.loc[examples["flag"] == "ok", ["source", "given_label"]].to_numpy().tolist()
    flip_kept = sorted(flips)[0]
    (relabel_source, relabel_given), (drop_source, _) = ok[0], ok[1]
    new_class = next(name for name in COLOURS if name != relabel_given)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        "source,decision,label\n"
        f"{flip_kept},keep,\n"
        f"{relabel_source},relabel,{new_class}\n"
        f"{drop_source},DROP,\n"
        "\n"
        f"{drop_source},drop,\n",  # the same decision twice is fine
        encoding="utf-8",
    )
    out = tmp_path / "cleaned.csv"
    result = CliRunner().invoke(main, ["clean", str(image_run.run_dir), "--out", str(out), "--decisions", str(decisions)])
    assert result.exit_code == 0, result.output
    trail = pd.read_csv(out.with_name("cleaned.trail.csv"), dtype=str, keep_default_na=False).set_index("source")
    assert trail.loc[flip_kept, ["action", "decided_by", "decision_line"]].tolist() == ["kept", "reviewer", "2"]
    assert trail.loc[relabel_source, ["action", "label", "old_label", "decision_line"]].tolist() == [
        "relabeled", new_class, relabel_given, "3"]
    assert trail.loc[drop_source, ["action", "decided_by", "decision_line"]].tolist() == ["dropped", "reviewer", "4"]
    # Where the reviewer said nothing, the rule (drop-mislabeled) decided.
    for source in set(flips) - {flip_kept}:
        assert trail.loc[source, ["action", "decided_by"]].tolist() == ["dropped", "rule"]
    manifest = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("source")
    assert flip_kept in manifest.index and drop_source not in manifest.index
    assert manifest.loc[relabel_source, "label"] == new_class
    provenance = json.loads(out.with_name("cleaned.provenance.json").read_text())
    assert provenance["decisions"]["count"] == 3
    assert provenance["decisions"]["sha256"] == hashlib.sha256(decisions.read_bytes()).hexdigest()


def test_bad_decisions_are_reported_with_file_and_line(image_run, tmp_path):
    examples = image_run.examples
    first, second = examples["source"].iloc[0], examples["source"].iloc[1]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        "source,decision,label\n"
        f"{first},keep,\n"
        "nope/x.png,drop,\n"
        f"{second},relabel,horse\n"
        f"{second},maybe,\n"
        f"{first},drop,\n"
        "cat/empty.png,drop,\n",
        encoding="utf-8",
    )
    out = tmp_path / "cleaned.csv"
    result = CliRunner().invoke(main, ["clean", str(image_run.run_dir), "--out", str(out), "--decisions", str(decisions)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"Error: {decisions} line 3: unknown source 'nope/x.png'")
    assert "line 4: unknown class 'horse'" in line
    assert "line 5: unknown decision 'maybe'" in line
    assert "line 6:" in line and "already decided on line 2" in line
    assert "line 7: source 'cat/empty.png' was set aside" in line
    assert not out.exists() and not out.with_name("cleaned.trail.csv").exists()


def test_read_decisions_counts_lines_of_quoted_cells(tmp_path):
    decisions = tmp_path / "d.csv"
    # A byte-order mark (Excel), extra columns, and a quoted note spanning two lines.
    decisions.write_bytes(
        '\ufeffSource,Decision,Label,note\n"a,1.png",keep,,"two\nlines"\nb.png,relabel,dog,\nc.png,relabel,,\n'.encode()
    )
    with pytest.raises(DecisionsError) as excinfo:
        read_decisions(decisions, sources=["a,1.png", "b.png", "c.png"], class_names=["cat", "dog"])
    assert str(excinfo.value) == f"{decisions} line 5: relabel of 'c.png' needs a label"
    decisions.write_text("source,label\nb.png,dog\n")
    with pytest.raises(DecisionsError, match="line 1: no 'decision' column"):
        read_decisions(decisions, sources=["b.png"], class_names=["dog"])


def test_outputs_that_would_touch_data_or_run_files_are_refused(image_run, flipped_images, tmp_path):
    root, _ = flipped_images
    data_before, run_before = tree_hash(root), run_files_hash(image_run.run_dir)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("source,decision,label\n")
    runner = CliRunner()
    for out, message in [
        (root / "cleaned.csv", "inside the data folder"),
        (root / "cat" / "new" / "cleaned.parquet", "inside the data folder"),
        (image_run.run_dir / "examples.parquet", "replace the run's or the data's own file"),
        (decisions, "replace the run's or the data's own file"),
        (tmp_path / "cleaned.txt", "must end in .csv or .parquet"),
    ]:
        result = runner.invoke(main, ["clean", str(image_run.run_dir), "--out", str(out), "--decisions", str(decisions)])
        assert result.exit_code == 1, (out, result.output)
        assert len(error_lines(result.output)) == 1 and message in result.output, result.output
    assert tree_hash(root) == data_before
    assert run_files_hash(image_run.run_dir) == run_before
    assert decisions.read_text() == "source,decision,label\n"


# --------------------------------------------------------------------------- tables, in-memory data, regression


@pytest.fixture(scope="module")
def flipped_table(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 30)
    features = rng.normal(size=(90, 4)) + labels[:, None] * 6.0
    given = labels.copy()
    flipped = [0, 35, 70]
    given[flipped] = (labels[flipped] + 1) % 3
    names = np.array(["low", "mid", "high"])
    frame = pd.DataFrame(features, columns=["a", "b", "c", "d"])
    frame.insert(2, "kind", names[given])  # the label column sits between features
    path = tmp_path_factory.mktemp("table") / "points.csv"
    frame.to_csv(path, index=False)
    return path, {row: str(names[labels[row]]) for row in flipped}


def test_table_clean_writes_the_rows_and_reaudits(flipped_table, tmp_path):
    path, flips = flipped_table
    original_bytes = path.read_bytes()
    runner = CliRunner()
    run_dir = tmp_path / "run"
    # The default budget: at 8 epochs and lr 0.01 on 90 rows the network had not yet
    # separated two of the classes, and a few ambiguous rows outranked a flip.
    cli = ["--device", "cpu", "--quiet"]
    assert runner.invoke(main, ["run", str(path), "--label-column", "kind", "--out", str(run_dir), *cli]).exit_code == 0
    examples = pd.read_parquet(run_dir / "examples.parquet")
    mislabeled = examples[examples["flag"] == "mislabeled"]
    assert {str(row) for row in flips} <= set(mislabeled["source"])

    out = tmp_path / "points-clean.csv"
    result = runner.invoke(main, ["clean", str(run_dir), "--out", str(out), "--rule", "relabel-mislabeled", "--json"])
    assert result.exit_code == 0, result.output
    provenance = json.loads(result.stdout)
    assert provenance["rerun_command"].endswith("--label-column kind")
    cleaned = pd.read_csv(out, dtype=str, keep_default_na=False)
    original = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(cleaned.columns) == list(original.columns)  # a table again, features and label
    assert len(cleaned) == len(original)
    relabeled_rows = set(mislabeled["source"].astype(int))
    unchanged = [row for row in range(len(original)) if row not in relabeled_rows]
    assert cleaned.iloc[unchanged].equals(original.iloc[unchanged])
    for row, true_label in flips.items():
        assert cleaned.loc[row, "kind"] == true_label
        assert cleaned.loc[row, ["a", "b", "c", "d"]].tolist() == original.loc[row, ["a", "b", "c", "d"]].tolist()

    reaudit = tmp_path / "reaudit"
    result = runner.invoke(main, ["run", str(out), "--label-column", "kind", "--out", str(reaudit), *cli])
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(reaudit / "examples.parquet")
    assert again["given_label"].tolist() == cleaned["kind"].tolist()

    # drop-flagged: the dropped rows are gone from the table and listed in the trail.
    dropped_out = tmp_path / "points-dropped.parquet"
    assert runner.invoke(main, ["clean", str(run_dir), "--out", str(dropped_out), "--rule", "drop-flagged"]).exit_code == 0
    kept = pd.read_parquet(dropped_out)
    flagged = examples[examples["flag"] != "ok"]
    assert len(kept) == len(examples) - len(flagged)
    assert pd.api.types.is_float_dtype(kept["a"])
    trail = pd.read_parquet(dropped_out.with_name("points-dropped.trail.parquet"))
    assert set(trail.loc[trail["action"] == "dropped", "source"]) == set(flagged["source"])
    assert path.read_bytes() == original_bytes


def test_a_table_changed_since_the_audit_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(size=(30, 3)), columns=["x", "y", "z"])
    frame["label"] = np.arange(30) % 2
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    result = minnorm_audit.audit(path, out=tmp_path / "run", epochs=1, device="cpu")
    frame.loc[4, "x"] += 1.0
    frame.to_csv(path, index=False)
    with pytest.raises(minnorm_audit.CleanError, match="changed since the audit"):
        minnorm_audit.clean(result, tmp_path / "clean.csv")


def test_in_memory_run_exports_positions(tmp_path):
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(rng.normal(size=(40, 3)), columns=["x", "y", "z"])
    frame["label"] = np.repeat(["a", "b"], 20)
    result = minnorm_audit.audit(frame, out=tmp_path / "run", epochs=1, device="cpu", flag_fraction=0.25)
    cleaned = minnorm_audit.clean(result.run_dir, tmp_path / "clean.csv", rule="drop-flagged")
    manifest = pd.read_csv(tmp_path / "clean.csv")
    assert list(manifest.columns) == ["label", "source", "action", "old_label"]
    flagged = set(result.examples.loc[result.examples["flag"] != "ok", "source"].astype(int))
    assert len(flagged) == 10
    assert set(manifest["source"]) == set(range(40)) - flagged
    assert cleaned.rerun_command is None and cleaned.provenance["input"]["layout"] == "dataframe"
    # The positions index the caller's own data.
    assert frame.iloc[manifest["source"]]["label"].tolist() == manifest["label"].tolist()


def test_regression_runs_can_drop_but_not_relabel(tmp_path):
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(rng.normal(size=(40, 3)), columns=list("abc"))
    frame["price"] = frame["a"] * 2
    path = tmp_path / "houses.csv"
    frame.to_csv(path, index=False)
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(path), "--task", "regression", "--label-column", "price", "--out",
                                  str(run_dir), "--epochs", "1", "--device", "cpu", "--quiet", "--flag-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "clean.csv"
    result = runner.invoke(main, ["clean", str(run_dir), "--out", str(out), "--rule", "drop-flagged"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 36
    result = runner.invoke(main, ["clean", str(run_dir), "--out", str(out), "--rule", "relabel-mislabeled"])
    assert result.exit_code == 1 and "regression" in error_lines(result.output)[0]


# --------------------------------------------------------------------------- the data root of a manifest


def test_data_root_still_confines_manifest_paths(tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(data / "a" / "1.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "secret.png")
    manifest = tmp_path / "elsewhere" / "m.csv"
    manifest.parent.mkdir()
    pd.DataFrame({"path": ["a/1.png", "../secret.png"], "label": ["x", "y"]}).to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"row 1: path '\.\./secret\.png' points outside the data root"):
        load_dataset(manifest, data_root=data)
    with pytest.raises(DataError, match="applies to a manifest"):
        load_dataset(data, data_root=data)


def test_clean_has_help():
    result = CliRunner().invoke(main, ["clean", "-h"])
    assert result.exit_code == 0 and "Example:" in result.output and "--decisions" in result.output
