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

# The synthetic run (tests/conftest.py) uses these class names and one gallery source
# with a script tag in it.
HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
QUOTES_CLASS = "\"&'<>"
REPORT_CLASSES = ["cat", "dog", HOSTILE_CLASS, QUOTES_CLASS, "bird"]

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
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "<script>pets" not in page
    assert "&#34;&amp;&#39;&lt;&gt;" in page  # the class named "&'<>
    # Our own inline script is the only script element.
    assert len(re.findall(r"<script\b", page, re.I)) == 1
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
    assert len(sources) == len(contents["gallery"]) > 0
    for source, expected in zip(sources, contents["gallery"]["thumbnail_png"]):
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
        row = re.search(rf'<tr data-class="{re.escape(escaped)}"><td class="name">[^<]*</td>((?:<td class="num">[^<]*</td>)+)', image_page)
        assert row, name
        cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
        assert int(cells[0].replace(",", "")) == int(in_class.sum())
        assert int(cells[1]) == int((in_class & (examples["flag"] == "mislabeled")).sum())
        assert int(cells[3]) == int((in_class & (examples["flag"] == "hard")).sum())
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
    assert "Otsu split of log(1 + difficulty)" in image_page
    assert "rank_stability &gt;= 0.99 for 2 evaluations" in image_page  # stopping rule
    assert "How to read this page" in image_page
    assert image_page.count("<svg") == 2  # distribution + convergence history


def test_no_demo_section_without_demo(make_run_folder) -> None:
    folder, _ = make_run_folder("plain", demo=False)
    page = _render(folder)
    assert 'id="demo"' not in page


def test_set_aside_rows_are_capped(make_run_folder) -> None:
    folder, _ = make_run_folder("many-broken", num_set_aside=450)
    page = _render(folder)
    section = page.split('id="set-aside"', 1)[1].split("</section>", 1)[0]
    assert section.count("broken/file_") == report_html.SET_ASIDE_MAX_ROWS
    assert "and 250 more" in section


def test_regression_run_has_no_label_tables(make_run_folder) -> None:
    folder, contents = make_run_folder("regression", task="regression", kind="table")
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


def test_empty_gallery_and_no_threshold(make_run_folder) -> None:
    folder, contents = make_run_folder("quiet", gallery_size=0, num_set_aside=0)
    summary = json.loads((folder / "summary.json").read_text())
    summary["flag_rule"]["difficulty_threshold"] = float("inf")
    write_json_atomic(folder / "summary.json", summary)
    page = _render(folder)
    assert "No example was flagged." in page
    assert "Nothing was set aside" in page
    assert "no threshold" in page


def test_disagreeing_summary_is_reported(fresh_image_run) -> None:
    folder, _ = fresh_image_run
    summary = json.loads((folder / "summary.json").read_text())
    summary["counts"]["mislabeled"] += 5
    write_json_atomic(folder / "summary.json", summary)
    page = _render(folder)
    assert "The run's files disagree" in page
    assert "summary.json counts" in page


def test_page_size_is_bounded_for_a_million_examples(make_run_folder) -> None:
    folder, contents = make_run_folder(
        "large", num_examples=1_000_000, gallery_size=60, num_set_aside=500, with_multipliers=False, demo=False
    )
    assert len(contents["gallery"]) == 60
    page = _render(folder)
    size = len(page.encode("utf-8"))
    assert size < 5 * 1024 * 1024, size
    assert page.count('<article class="item') == 60
    assert 'data-count="examples">1,000,000<' in page


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
    assert run.metadata["class_names"] == REPORT_CLASSES
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
        "difficulty_percentile", "flag", "label_concentration", "margin", "class_multipliers",
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

