"""Unit tests for minnorm_audit.report: atomic writers, Parquet schema, the HTML page."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
from html.parser import HTMLParser
import json
import math
import os
import re
import shlex
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from minnorm_audit.report import (
    EXAMPLES_DESCRIPTIONS,
    GALLERY_DESCRIPTIONS,
    SET_ASIDE_DESCRIPTIONS,
    atomic_write_bytes,
    atomic_write_text,
    build_report_html,
    load_run,
    read_metadata,
    render_report,
    write_json_atomic,
    write_parquet_atomic,
)
from minnorm_audit.report import html as report_html
from minnorm_audit.report import parquet as report_parquet

# The real image run (tests/conftest.py) uses these class names and one file whose
# name is a script tag.
from conftest import HOSTILE_CLASS, NOT_LEARNED_CLASS, QUOTES_CLASS, REPORT_CLASSES, SCRIPT_SOURCE

# --------------------------------------------------------------------------- helpers


def _render(folder: Path) -> str:
    path = render_report(folder)
    assert path == folder / "report.html"
    return path.read_text(encoding="utf-8")


def _attribute_values(page: str, names: tuple[str, ...]) -> list[str]:
    return [value or "" for _, attributes in _parse_tags(page) for name, value in attributes if name in names]


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def _parse_tags(page: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    collector = _TagCollector()
    collector.feed(page)
    collector.close()
    return collector.tags


def _temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


@pytest.fixture(scope="module")
def image_run(make_run_folder):
    """A rendered image run shared by the read-only tests of this module."""
    return make_run_folder("images")


@pytest.fixture(scope="module")
def image_page(image_run) -> str:
    folder, _ = image_run
    return _render(folder)


@pytest.fixture
def fresh_image_run(make_run_folder):
    """An image run a test may change or break."""
    return make_run_folder("images")


# --------------------------------------------------------------------------- escaping and offline safety


def test_autoescape_is_on_for_the_report_template() -> None:
    environment = report_html.make_environment()
    assert environment.autoescape("report.html.j2") is True
    assert environment.autoescape("anything.else") is True
    assert environment.from_string("{{ name }}").render(name="<script>x</script>") == "&lt;script&gt;x&lt;/script&gt;"
    template_source = environment.loader.get_source(environment, "report.html.j2")[0]
    assert "|safe" not in template_source.replace(" ", "")


def test_hostile_names_are_escaped(image_page: str) -> None:
    page = image_page
    assert "<img src=x onerror" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script>alert(2)" not in page
    assert "&lt;script&gt;alert(2).png" in page  # the file name, in the first page's cards
    assert "\\u003cscript\\u003ealert(2).png" in page  # and in the gallery's JSON
    assert "&#34;&amp;&#39;&lt;&gt;" in page  # the class named "&'<>
    # Our own inline script is the only script that runs; the other is the gallery's data.
    assert len(re.findall(r"<script\b", page, re.I)) == 2
    assert len(re.findall(r'<script type="application/json" id="gallery-data">', page)) == 1
    # Parsed as a browser would: no event-handler attribute, no image but the thumbnails.
    tags = _parse_tags(page)
    assert not [(tag, name) for tag, attributes in tags for name, _ in attributes if name.startswith("on")]
    assert all(dict(attributes).get("class") == "thumb" for tag, attributes in tags if tag == "img")


def test_no_external_urls_and_csp(image_page: str) -> None:
    page = image_page
    for value in _attribute_values(page, ("src", "href", "xlink:href", "action", "srcset", "poster", "data", "background")):
        assert value.startswith(("data:", "#")), value
        assert "http://" not in value and "https://" not in value
    assert all(target.startswith("#") for target in re.findall(r"url\(\s*['\"]?([^)'\"]*)", page))
    assert "@import" not in page
    match = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert match, "CSP meta tag missing"
    policy = html_lib.unescape(match.group(1))
    assert "default-src 'none'" in policy
    assert "img-src data:" in policy
    assert "unsafe-eval" not in policy
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    assert f"script-src 'sha256-{digest}'" in policy


def test_thumbnails_are_png_data_uris(image_run, image_page: str) -> None:
    _, contents = image_run
    sources = re.findall(r'<img class="thumb" src="([^"]+)"', image_page)
    gallery = contents["gallery"]
    shown = gallery[gallery["flag"] != "outlier"].head(24)
    assert len(sources) == len(shown) + int((gallery["flag"] == "outlier").head(24).sum()) > 0
    for source, expected in zip(sources, shown["thumbnail_png"]):
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]) == expected
    assert "image-rendering: pixelated" in image_page


def test_page_reads_without_javascript(image_page: str) -> None:
    # Every gallery item is visible by default; the filter controls only appear with JS.
    assert not re.search(r'<article class="item[^>]*\shidden', image_page)
    assert re.search(r'<div class="controls" id="gallery-controls" hidden>', image_page)


# --------------------------------------------------------------------------- contents


def test_counts_match_the_frames(image_run, image_page: str) -> None:
    _, contents = image_run
    examples = contents["examples"]
    flags = examples["flag"].value_counts()

    def shown(name: str) -> int:
        match = re.search(rf'data-count="{name}">([\d,]+)<', image_page)
        assert match, name
        return int(match.group(1).replace(",", ""))

    assert shown("examples") == len(examples)
    assert shown("set_aside") == len(contents["set_aside"])
    for flag in ("mislabeled", "hard", "ok"):
        assert shown(flag) == int(flags.get(flag, 0))
    for name in REPORT_CLASSES:
        in_class = examples["given_label"] == name
        escaped = html_lib.escape(name, quote=True).replace("&#x27;", "&#39;").replace("&quot;", "&#34;")
        row = re.search(rf'<tr data-class="{re.escape(escaped)}"><td class="name">[^<]*</td>((?:<td class="num[^"]*">[^<]*</td>)+)', image_page)
        assert row, name
        cells = re.findall(r'<td class="num[^"]*">([^<]*)</td>', row.group(1))
        assert int(cells[0].replace(",", "")) == int(in_class.sum())
        recall = float((examples.loc[in_class, "margin"] > 0).mean())
        assert cells[1] == f"{100 * recall:.1f}%"
        for position, flag in ((3, "mislabeled"), (4, "hard"), (5, "outlier")):
            assert int(cells[position]) == int((in_class & (examples["flag"] == flag)).sum())
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", image_page.split('id="per-class"', 1)[1].split("</thead>", 1)[0])
    assert len(headers) == len(set(headers)) and "Outliers" in headers
    assert "The run's files disagree" not in image_page


def test_label_pair_table_counts(image_run, image_page: str) -> None:
    _, contents = image_run
    examples = contents["examples"]
    mislabeled = examples.loc[examples["flag"] == "mislabeled"]
    pairs = mislabeled.groupby(["given_label", "suggested_label"]).size()
    section = image_page.split('id="pairs"', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r'<td class="name">([^<]*)</td><td class="arrow">&rarr;</td><td class="name">([^<]*)</td><td class="num">(\d+)</td>', section)
    assert 0 < len(rows) <= 20
    for given, suggested, count in rows:
        assert pairs[(html_lib.unescape(given), html_lib.unescape(suggested))] == int(count)
    assert int(rows[0][2]) == pairs.max()


def test_demo_precision_recall_and_rule(image_page: str) -> None:
    assert "precision 85.0%" in image_page and "recall 80.0%" in image_page
    assert "per class (class_thresholds)" in image_page
    assert "fixed budget of 10 epochs" in image_page  # stopping rule
    # Plain words first, the method below the gallery.
    assert image_page.index('id="plain-summary"') < image_page.index('id="gallery"') < image_page.index('id="how-it-scores"')
    assert image_page.count("<svg") == 2  # distribution + convergence history


def test_no_demo_section_without_demo(make_run_folder) -> None:
    folder, _ = make_run_folder("plain", demo=False)
    page = _render(folder)
    assert 'id="demo"' not in page


def test_set_aside_rows_are_capped(image_run, image_page: str) -> None:
    _, contents = image_run
    hidden = len(contents["set_aside"]) - report_html.SET_ASIDE_MAX_ROWS
    assert hidden > 0
    section = image_page.split('id="set-aside"', 1)[1].split("</section>", 1)[0]
    assert section.count("/broken-") == report_html.SET_ASIDE_MAX_ROWS
    assert f"and {hidden} more" in section


def test_regression_run_has_no_label_tables(make_run_folder) -> None:
    folder, contents = make_run_folder("regression", kind="regression")
    page = _render(folder)
    assert 'id="classes"' not in page and 'id="pairs"' not in page
    assert 'data-count="mislabeled"' not in page
    assert "given target" in page and "predicted" in page
    first = contents["gallery"].iloc[0]
    assert report_html.format_number(float(first["predicted_target"])) in page


def test_table_run_shows_feature_rows_escaped(make_run_folder) -> None:
    folder, contents = make_run_folder("table", kind="table")
    page = _render(folder)
    assert "<img class=\"thumb\"" not in page
    assert "feature_0" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_nothing_flagged(make_run_folder) -> None:
    folder, contents = make_run_folder("quiet", kind="quiet")
    assert (contents["examples"]["flag"] == "ok").all() and len(contents["set_aside"]) == 0
    page = _render(folder)
    assert "No example was flagged." in page
    assert "Nothing was set aside" in page
    assert "nothing was flagged; nothing to review" in page


def test_disagreeing_summary_is_reported(fresh_image_run) -> None:
    folder, _ = fresh_image_run
    summary = json.loads((folder / "summary.json").read_text())
    summary["counts"]["mislabeled"] += 5
    write_json_atomic(folder / "summary.json", summary)
    page = _render(folder)
    assert "The run's files disagree" in page
    assert "summary.json counts" in page


def test_page_size_is_bounded_for_a_million_examples(make_run_folder) -> None:
    # The real image run's examples repeated to a million rows (a tenth of them flagged
    # mislabeled), written and summed up as the writer does.
    folder, contents = make_run_folder("large", demo=False)
    examples = contents["examples"].drop(columns=["class_multipliers"])
    repeats = -(-1_000_000 // len(examples))
    large = pd.concat([examples] * repeats, ignore_index=True).head(1_000_000)
    large["example_id"] = np.arange(len(large), dtype=np.int64)
    large.loc[large.index % 10 == 0, "flag"] = "mislabeled"
    write_parquet_atomic(folder / "examples.parquet", large, descriptions=EXAMPLES_DESCRIPTIONS,
                         metadata=contents["metadata"])
    summary = contents["summary"]
    summary["num_examples"] = len(large)
    summary["counts"] = {flag: int((large["flag"] == flag).sum()) for flag in summary["counts"]}
    write_json_atomic(folder / "summary.json", summary)
    page = _render(folder)
    size = len(page.encode("utf-8"))
    assert size < 5 * 1024 * 1024, size
    assert page.count('<article class="item') == 24  # the first page (the run's --gallery-size)
    assert 'data-count="examples">1,000,000<' in page
    flagged = int((large["flag"].isin(["mislabeled", "hard"])).sum())
    assert f"the {report_html.FLAGGED_LIST_MAX:,} most difficult can be paged through here" in page
    assert f"All {flagged:,} flagged" in page


def test_build_report_html_from_run_files(fresh_image_run) -> None:
    folder, _ = fresh_image_run
    page = build_report_html(load_run(folder))
    assert page.startswith("<!DOCTYPE html>")
    assert not (folder / "report.html").exists()


def test_template_ships_as_package_data() -> None:
    templates = resources.files("minnorm_audit.report") / "templates"
    for name in ("report.html.j2", "report.css", "report.js"):
        assert (templates / name).is_file(), name


# --------------------------------------------------------------------------- reading


def test_load_run_reads_everything(image_run) -> None:
    folder, contents = image_run
    run = load_run(folder)
    assert len(run.examples) == len(contents["examples"])
    assert run.summary["num_examples"] == len(contents["examples"])
    assert list(run.set_aside.columns) == ["source", "reason"]
    assert len(run.gallery) == len(contents["gallery"])
    assert run.metadata["class_names"] == sorted(REPORT_CLASSES)
    assert run.task == "classification"
    only = load_run(folder, example_columns=["difficulty", "flag", "not_a_column"])
    assert list(only.examples.columns) == ["difficulty", "flag"]


@pytest.mark.parametrize("missing", ["examples.parquet", "summary.json", "set_aside.parquet", "gallery.parquet"])
def test_load_run_names_the_missing_file(fresh_image_run, missing: str) -> None:
    folder, _ = fresh_image_run
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as error:
        load_run(folder)
    assert "\n" not in str(error.value)


def test_load_run_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path / "nope")


def test_load_run_rejects_bad_summary(fresh_image_run) -> None:
    folder, _ = fresh_image_run
    (folder / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="summary.json"):
        load_run(folder)


# --------------------------------------------------------------------------- Parquet schema


def test_parquet_descriptions_and_metadata_round_trip(image_run) -> None:
    folder, contents = image_run
    expected = {
        "examples.parquet": EXAMPLES_DESCRIPTIONS,
        "set_aside.parquet": SET_ASIDE_DESCRIPTIONS,
        "gallery.parquet": GALLERY_DESCRIPTIONS,
    }
    for name, descriptions in expected.items():
        schema = pq.read_schema(folder / name)
        for field in schema:
            assert field.metadata[b"description"].decode() == descriptions[field.name]
        assert read_metadata(folder / name) == json.loads(json.dumps(contents["metadata"]))
    schema = pq.read_schema(folder / "examples.parquet")
    assert schema.field("example_id").type == pa.int64()
    assert schema.field("source").type == pa.string()
    assert schema.field("difficulty").type == pa.float64()
    assert schema.field("class_multipliers").type == pa.list_(pa.float32())
    gallery_schema = pq.read_schema(folder / "gallery.parquet")
    assert gallery_schema.field("thumbnail_png").type == pa.binary()
    assert gallery_schema.field("feature_values").type == pa.string()  # all null for images
    round_trip = pd.read_parquet(folder / "examples.parquet")
    pd.testing.assert_series_equal(round_trip["difficulty"], contents["examples"]["difficulty"], check_names=False)
    assert round_trip["class_multipliers"].iloc[0].dtype == np.float32


def test_every_contract_column_has_a_description() -> None:
    classification = {
        "example_id", "source", "given_label", "suggested_label", "competing_label", "difficulty",
        "difficulty_percentile", "flag", "label_concentration", "margin", "predicted_label", "class_multipliers",
    }  # fmt: skip
    assert classification | {"given_target", "predicted_target"} <= set(EXAMPLES_DESCRIPTIONS)
    assert {"source", "reason"} == set(SET_ASIDE_DESCRIPTIONS)
    gallery = {
        "example_id", "source", "given_label", "suggested_label", "competing_label", "difficulty",
        "difficulty_percentile", "flag", "thumbnail_png", "feature_values", "given_target", "predicted_target",
    }  # fmt: skip
    assert gallery <= set(GALLERY_DESCRIPTIONS)
    for descriptions in (EXAMPLES_DESCRIPTIONS, SET_ASIDE_DESCRIPTIONS, GALLERY_DESCRIPTIONS):
        assert all(isinstance(text, str) and text.strip() for text in descriptions.values())


def test_empty_set_aside_keeps_string_types(tmp_path: Path) -> None:
    path = tmp_path / "set_aside.parquet"
    write_parquet_atomic(path, pd.DataFrame({"source": [], "reason": []}), descriptions=SET_ASIDE_DESCRIPTIONS, metadata={})
    schema = pq.read_schema(path)
    assert schema.field("source").type == pa.string() and schema.field("reason").type == pa.string()
    assert len(pd.read_parquet(path)) == 0


def test_missing_column_description_raises(tmp_path: Path) -> None:
    frame = pd.DataFrame({"source": ["a"], "reason": ["b"], "surprise": [1]})
    with pytest.raises(ValueError, match="surprise"):
        write_parquet_atomic(tmp_path / "x.parquet", frame, descriptions=SET_ASIDE_DESCRIPTIONS, metadata={})
    assert os.listdir(tmp_path) == []


def test_parquet_metadata_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    metadata = {"diagnostics": {"max_violation": float("nan"), "norm": np.float32(2.5)}, "seed": np.int64(3), "path": tmp_path}
    write_parquet_atomic(path, pd.DataFrame({"source": ["a"], "reason": ["b"]}), descriptions=SET_ASIDE_DESCRIPTIONS, metadata=metadata)
    raw = pq.read_schema(path).metadata[b"minnorm_audit"].decode()
    assert "NaN" not in raw
    assert read_metadata(path) == {"diagnostics": {"max_violation": None, "norm": 2.5}, "seed": 3, "path": str(tmp_path)}


def test_read_metadata_requires_our_key(tmp_path: Path) -> None:
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    with pytest.raises(ValueError, match="minnorm_audit"):
        read_metadata(path)


# --------------------------------------------------------------------------- atomic writes


def test_json_nan_and_inf_become_null(tmp_path: Path) -> None:
    path = write_json_atomic(
        tmp_path / "summary.json",
        {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32("nan"), "d": np.arange(2), "e": pd.NA},
    )
    text = path.read_text()

    def reject(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    assert json.loads(text, parse_constant=reject) == {"a": None, "b": [None, None, 1.5], "c": None, "d": [0, 1], "e": None}
    assert text.startswith('{\n  "a": null')


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(tmp_path / "file.txt", "héllo")
    assert (tmp_path / "file.txt").read_text(encoding="utf-8") == "héllo"
    assert _temp_files(tmp_path) == []


def test_failed_byte_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    target.write_text("previous")

    def broken_fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report_parquet.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"new": 1})
    assert target.read_text() == "previous"
    assert _temp_files(tmp_path) == []


def test_failed_replace_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.html"
    target.write_text("previous")

    def broken_replace(source: str, destination: str) -> None:
        raise OSError("no")

    monkeypatch.setattr(report_parquet.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["report.html"]


def test_failed_parquet_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "set_aside.parquet"
    old = pd.DataFrame({"source": ["old.png"], "reason": ["truncated"]})
    write_parquet_atomic(target, old, descriptions=SET_ASIDE_DESCRIPTIONS, metadata={"version": 1})
    before = target.read_bytes()
    real_write_table = report_parquet.pq.write_table

    def half_write(table: pa.Table, where, **kwargs) -> None:
        where.write(b"PAR1 half a file")
        raise OSError("killed mid-write")

    monkeypatch.setattr(report_parquet.pq, "write_table", half_write)
    new = pd.DataFrame({"source": ["new.png"], "reason": ["empty"]})
    with pytest.raises(OSError, match="mid-write"):
        write_parquet_atomic(target, new, descriptions=SET_ASIDE_DESCRIPTIONS, metadata={"version": 2})
    assert target.read_bytes() == before
    assert _temp_files(tmp_path) == [] and os.listdir(tmp_path) == ["set_aside.parquet"]
    monkeypatch.setattr(report_parquet.pq, "write_table", real_write_table)
    assert read_metadata(target) == {"version": 1}


def test_failed_render_keeps_previous_report(fresh_image_run, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = fresh_image_run
    (folder / "report.html").write_text("previous report")

    def broken_fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report_parquet.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        render_report(folder)
    assert (folder / "report.html").read_text() == "previous report"
    assert _temp_files(folder) == []


def test_format_number() -> None:
    assert report_html.format_number(None) == "\u2014"
    assert report_html.format_number(float("nan")) == "\u2014"
    assert report_html.format_number(12) == "12"
    assert report_html.format_number(1234567) == "1,234,567"
    assert report_html.format_number(0.012345) == "0.01235"
    assert report_html.format_number(3.0) == "3"
    assert report_html.format_number(1e-6) == "1.000e-06"
    assert report_html.format_number(math.inf) == "\u221e"
    assert report_html.format_number("cosine") == "cosine"
    assert report_html.format_number([1, 2]) == "[1, 2]"
    assert report_html.format_percent(0.1234) == "12.3%"
    assert report_html.format_count(1000) == "1,000"



# --------------------------------------------------------------------------- what a QA person reads first


def _fit_cell(page: str, name: str) -> tuple[str, str]:
    row = re.search(rf'<tr data-fit="{name}"><td>[^<]*</td><td class="num">([^<]*)</td><td class="line">([^<]*)</td>',
                    page)
    assert row, name
    return row.group(1), row.group(2)


def test_fit_figures_and_thresholds_beside_a_conclusive_verdict(image_run, image_page: str) -> None:
    _, contents = image_run
    fit = contents["summary"]["fit"]
    assert contents["summary"]["inconclusive"] is None
    value, line = _fit_cell(image_page, "train_accuracy")
    assert value == f"{100 * fit['train_accuracy']:.1f}%" and line == "inconclusive below 50%"
    value, line = _fit_cell(image_page, "balanced_accuracy")
    # Five classes: halfway from chance (20%) to 1.
    assert value == f"{100 * fit['balanced_accuracy']:.1f}%" and line == "inconclusive below 60.0%"
    assert fit["inconclusive_below"] == {"train_accuracy": 0.5, "balanced_accuracy": pytest.approx(0.6)}
    assert _fit_cell(image_page, "fraction_fitted")[0] == f"{100 * fit['fraction_fitted']:.1f}%"


def test_plain_words_summary_and_next_step(image_run, image_page: str) -> None:
    _, contents = image_run
    counts = contents["summary"]["counts"]
    plain = re.sub(r"<[^>]+>", "", image_page.split('id="plain-summary"', 1)[1].split("</div>", 1)[0])
    plain = " ".join(html_lib.unescape(plain).split())
    assert f"{contents['summary']['num_examples']} examples, {counts['mislabeled']} look mislabeled" in plain
    assert f"Next step: review the {counts['mislabeled']} likely mislabeled examples" in plain
    expected = round(contents["summary"]["flag_rule"]["expected_errors_among_flagged"])
    assert f"expect about {expected} of them to be real label errors" in plain
    assert "minnorm-audit clean " in plain
    # Solver words stay in "How it scores".
    for word in ("Lagrange", "multiplier", "spread"):
        assert word not in plain


def test_expected_real_errors_are_read_from_the_flag_rule(fresh_image_run) -> None:
    folder, contents = fresh_image_run
    summary = contents["summary"]
    summary["flag_rule"]["expected_errors_among_flagged"] = 7.6
    write_json_atomic(folder / "summary.json", summary)
    page = html_lib.unescape(re.sub(r"<[^>]+>", "", _render(folder)))
    assert "expect about 8 of them to be real label errors, the rest ambiguous" in " ".join(page.split())


def test_a_class_not_learned_is_a_finding_not_a_clean_bill(make_run_folder) -> None:
    folder, contents = make_run_folder("not-learned", kind="table")
    summary, examples = contents["summary"], contents["examples"]
    assert summary["inconclusive"] is None  # the run as a whole is conclusive
    rows = examples[examples["given_label"] == NOT_LEARNED_CLASS]
    recall = float((rows["margin"] > 0).mean())
    assert recall < 0.5
    # predicted_label: the given label exactly where the margin is above 0.
    assert ((examples["predicted_label"] == examples["given_label"]) == (examples["margin"] > 0)).all()
    assert (rows["predicted_label"] != NOT_LEARNED_CLASS).mean() > 0.5
    [finding] = summary["not_learned"]
    assert finding["class"] == NOT_LEARNED_CLASS and finding["count"] == len(rows)
    assert finding["training_recall"] == pytest.approx(recall)
    assert finding["finding"].startswith(f"class {NOT_LEARNED_CLASS} not learned: its {len(rows)} examples are not judged")
    per_class = {row["class"]: row for row in summary["per_class"]}
    assert per_class[NOT_LEARNED_CLASS]["not_learned"] and per_class[NOT_LEARNED_CLASS]["training_recall"] == recall
    assert not any(row["not_learned"] for name, row in per_class.items() if name != NOT_LEARNED_CLASS)
    for row in per_class.values():
        in_class = examples["given_label"] == row["class"]
        assert row["outlier"] == int((in_class & (examples["flag"] == "outlier")).sum())
    page = _render(folder)
    assert f"Class {NOT_LEARNED_CLASS} not learned: its {len(rows)} examples are not judged." in page
    row = re.search(rf'<tr data-class="{NOT_LEARNED_CLASS}" class="not-learned">.*?</tr>', page, re.S)
    assert row and "not learned: not judged" in row.group(0)
    # Not-learned classes head the table.
    assert page.split('id="per-class"', 1)[1].index(f'data-class="{NOT_LEARNED_CLASS}"') < \
        page.split('id="per-class"', 1)[1].index('data-class="a"')


def test_settings_show_what_the_run_used(image_run, image_page: str) -> None:
    _, contents = image_run
    config, diagnostics = contents["summary"]["config"], contents["summary"]["diagnostics"]
    section = html_lib.unescape(image_page.split('id="settings"', 1)[1])
    cap = report_html.format_number(diagnostics["max_multiplier"])
    assert f"<td>multiplier_cap</td><td>C = {cap} (1 \u00d7 the 90th percentile" in section
    assert config["damping"] is None and "<td>damping</td><td>2 \u00d7 dual_lr = 0.02</td>" in section
    assert config["workers"] <= config["cpu_cores"] == (os.cpu_count() or 1)
    assert f"<td>workers</td><td>{config['workers']} (at most the {config['cpu_cores']} CPU cores)</td>" in section
    assert "not used by the verdict" in section.split('data-key="fraction_fitted"', 1)[1].split("</tr>", 1)[0]


def test_header_and_review_command_name_the_run_folder_that_resolves(
    image_run, image_page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from minnorm_audit.cli import main

    folder, contents = image_run
    assert f'run folder <span class="mono" id="run-path">{folder.resolve()}</span>' in image_page
    assert " run run" not in image_page
    command = html_lib.unescape(re.search(r'<code id="review-command">([^<]*)</code>', image_page).group(1))
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("source,decision,label\n")
    # Run as printed, from a directory that is neither the run's nor its parent.
    monkeypatch.chdir(tmp_path)
    arguments = shlex.split(command.replace("FILE", str(decisions)))
    assert arguments[:2] == ["minnorm-audit", "clean"]
    result = CliRunner().invoke(main, arguments[1:] + ["--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cleaned.csv").is_file()


def test_cards_say_how_hard_in_words(image_page: str) -> None:
    assert "(top " not in image_page
    assert re.search(r"\(harder than \d+(\.\d)?% of examples\)", image_page)


def test_tick_labels_tell_a_narrow_range_apart() -> None:
    from minnorm_audit.report import plots

    difficulty = np.linspace(1.0, 1.06, 200)
    svg = plots._difficulty_plot_svg(difficulty, np.array(["ok"] * 200), None)
    labels = re.findall(r'text-anchor="middle" dominant-baseline="hanging"[^>]*>([^<]+)</text>', svg)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    assert plots._tick_labels([0.0, 0.5, 1.0]) == ["0", "0.5", "1"]  # 2 digits still when they suffice


def test_gallery_size_sets_the_page_and_every_flagged_example_is_listed(make_run_folder) -> None:
    folder, contents = make_run_folder("paged")
    examples = contents["examples"]
    flagged = examples[examples["flag"].isin(["mislabeled", "hard"])].sort_values("difficulty", ascending=False)
    page = render_report(folder, gallery_size=3).read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', page, re.S).group(1))
    assert data["pageSize"] == 3
    listed = data["sections"]["gallery"]["items"]
    assert [item["s"] for item in listed] == flagged["source"].tolist()
    assert len(flagged) > 3 and page.count('<article class="item') == 3 + min(3, int((examples["flag"] == "outlier").sum()))
    with pytest.raises(ValueError, match="gallery_size"):
        render_report(folder, gallery_size=0)
