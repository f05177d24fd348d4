"""The HTML report in a real browser: headless Chromium (Debian packages) via selenium.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium``. Skipped
when they are missing, except under CI (the ``CI`` environment variable), where a
missing browser fails the run instead of silently testing nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minnorm_audit.report import render_report

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MINNORM_AUDIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MINNORM_AUDIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WINDOW_WIDTH = 1280


def _missing(reason: str) -> None:
    message = f"{reason}; install the browser with `apt-get install -y chromium chromium-driver` and `pip install selenium`"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def webdriver_module() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        _missing("selenium is not installed")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.is_file() and os.access(path, os.X_OK)):
            _missing(f"{path} not found")
    return webdriver


@pytest.fixture(scope="module")
def driver(webdriver_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver_module.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--window-size={WINDOW_WIDTH},1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    service = Service(executable_path=str(CHROMEDRIVER))
    browser = webdriver_module.Chrome(service=service, options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


# Gallery page size in the browser tests: a real run with more flagged examples than a
# page holds.
PAGE_SIZE = 4


@pytest.fixture(scope="module")
def report(make_run_folder: Any) -> tuple[Path, dict[str, Any]]:
    folder, contents = make_run_folder("browser-run")
    return render_report(folder, gallery_size=PAGE_SIZE), contents


def _open(driver: Any, page: Path) -> str:
    driver.get_log("browser")  # drop anything logged before this page
    driver.get_log("performance")
    url = page.resolve().as_uri()
    driver.get(url)
    driver.execute_script("return document.readyState")  # wait for the load to finish
    return url


def _severe(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def _requests(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_report_loads_offline_and_cleanly(driver: Any, report: tuple[Path, dict[str, Any]]) -> None:
    page, contents = report
    url = _open(driver, page)

    images = driver.execute_script(
        "return Array.from(document.images).map(function (image) {"
        "  return {src: image.src.slice(0, 22), complete: image.complete, width: image.naturalWidth}; });"
    )
    gallery = contents["gallery"]
    with_thumbnails = min(PAGE_SIZE, int((gallery["flag"] != "outlier").sum())) + \
        min(PAGE_SIZE, int((gallery["flag"] == "outlier").sum()))
    assert len(images) == with_thumbnails > 0
    for image in images:
        assert image["src"] == "data:image/png;base64,"
        assert image["complete"] and image["width"] > 0, image

    assert _severe(driver) == []
    requests = _requests(driver)
    assert url in requests
    # chrome:// (and chrome-untrusted://) are the browser's own UI resources, which a
    # headless Chromium sometimes loads in the same session; a file:// page cannot
    # request them, and they never leave the machine.
    internal = ("data:", "about:blank", "chrome://", "chrome-untrusted://")
    unexpected = [request for request in requests if request != url and not request.startswith(internal)]
    assert unexpected == [], unexpected

    # The whole page in one screenshot, for a person to look at.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WINDOW_WIDTH, min(int(height) + 200, 16000))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    assert driver.save_screenshot(str(screenshot))
    print(f"report screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    driver.set_window_size(WINDOW_WIDTH, 1000)


def test_hostile_class_name_is_text_and_runs_nothing(driver: Any, report: tuple[Path, dict[str, Any]]) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    page, _ = report
    _open(driver, page)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - the property raises when no alert is open
    body = driver.find_element(By.TAG_NAME, "body").text
    assert HOSTILE_CLASS in body
    # A file named like a script tag: on some page of the gallery, as text.
    from conftest import SCRIPT_SOURCE

    for _ in range(100):
        if SCRIPT_SOURCE in [card.get_attribute("data-source")
                             for card in driver.find_elements(By.CSS_SELECTOR, "#gallery-items .item")]:
            break
        driver.find_element(By.CSS_SELECTOR, '.pager[data-section="gallery"] .page-next').click()
    card = next(card for card in driver.find_elements(By.CSS_SELECTOR, "#gallery-items .item")
                if card.get_attribute("data-source") == SCRIPT_SOURCE)
    assert card.find_element(By.CSS_SELECTOR, ".source").text == SCRIPT_SOURCE
    assert driver.execute_script("return document.querySelectorAll('img:not(.thumb)').length") == 0
    # Our script and the gallery's JSON (not run: its type is application/json).
    assert driver.execute_script(
        "return Array.from(document.scripts).map(function (s) { return s.type; }).sort().join(',')") == ",application/json"
    # The name is visible on screen in the per-class table.
    cells = [cell for cell in driver.find_elements(By.CSS_SELECTOR, "#classes td.name") if cell.text == HOSTILE_CLASS]
    assert cells and cells[0].is_displayed()
    assert _severe(driver) == []


def test_gallery_pages_filters_and_keeps_decisions(driver: Any, report: tuple[Path, dict[str, Any]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page, contents = report
    examples = contents["examples"]
    flagged = examples[examples["flag"].isin(["mislabeled", "hard"])].sort_values("difficulty", ascending=False)
    total = len(flagged)
    assert total > 2 * PAGE_SIZE  # more flagged examples than a page holds
    _open(driver, page)
    assert driver.find_element(By.ID, "gallery-controls").is_displayed()
    status = driver.find_element(By.ID, "gallery-status")
    pager = driver.find_element(By.CSS_SELECTOR, '.pager[data-section="gallery"]')
    next_button = pager.find_element(By.CSS_SELECTOR, ".page-next")
    previous_button = pager.find_element(By.CSS_SELECTOR, ".page-prev")
    pages = -(-total // PAGE_SIZE)

    def cards() -> list[Any]:
        return driver.find_elements(By.CSS_SELECTOR, "#gallery-items .item")

    def sources() -> list[str]:
        return [card.get_attribute("data-source") for card in cards()]

    # Every flagged example, most difficult first, a page at a time.
    assert status.text == f"Showing 1\u2013{PAGE_SIZE} of {total} \u00b7 page 1 of {pages}"
    assert pager.is_displayed() and not previous_button.is_enabled()
    seen = []
    for number in range(pages):
        assert len(cards()) == min(PAGE_SIZE, total - number * PAGE_SIZE)
        seen += sources()
        if number < pages - 1:
            next_button.click()
    assert seen == flagged["source"].tolist()
    assert not next_button.is_enabled()
    assert status.text.endswith(f"page {pages} of {pages}")
    # Past the stored thumbnails the cards say so instead of showing one.
    stored = int((contents["gallery"]["flag"] != "outlier").sum())
    if total > stored:
        assert cards()[-1].find_element(By.CSS_SELECTOR, ".nothumb").text == "no thumbnail stored"

    # A decision on the last page survives paging away and back, and counts.
    last = cards()[0]
    source = last.get_attribute("data-source")
    last.find_element(By.CSS_SELECTOR, "button.drop").click()
    for _ in range(pages - 1):
        previous_button.click()
    assert source not in sources()
    for _ in range(pages - 1):
        next_button.click()
    again = next(card for card in cards() if card.get_attribute("data-source") == source)
    assert again.find_element(By.CSS_SELECTOR, "button.drop").get_attribute("aria-pressed") == "true"
    assert driver.find_element(By.ID, "review-status").text == "1 decision: 0 keep, 1 drop, 0 relabel"
    driver.find_element(By.ID, "review-clear").click()

    # Filters apply to the whole list, not only to the page shown.
    flag_filter = Select(driver.find_element(By.ID, "filter-flag"))
    flag_filter.select_by_value("mislabeled")
    mislabeled = flagged[flagged["flag"] == "mislabeled"]
    assert status.text.startswith(f"Showing 1\u2013{min(PAGE_SIZE, len(mislabeled))} of {len(mislabeled)} matching")
    assert {card.get_attribute("data-flag") for card in cards()} == {"mislabeled"}
    suggested = mislabeled["suggested_label"].iloc[0]
    Select(driver.find_element(By.ID, "filter-suggested")).select_by_value(suggested)
    expected = mislabeled[mislabeled["suggested_label"] == suggested]
    assert sources() == expected["source"].head(PAGE_SIZE).tolist()
    Select(driver.find_element(By.ID, "filter-suggested")).select_by_value("")
    flag_filter.select_by_value("")
    class_filter = Select(driver.find_element(By.ID, "filter-class"))
    class_filter.select_by_value(HOSTILE_CLASS)
    involved = flagged[(flagged["given_label"] == HOSTILE_CLASS) | (flagged["suggested_label"] == HOSTILE_CLASS)]
    assert sources() == involved["source"].head(PAGE_SIZE).tolist()
    class_filter.select_by_value("")
    Select(driver.find_element(By.ID, "sort-order")).select_by_value("asc")
    assert sources() == flagged["source"].iloc[::-1].head(PAGE_SIZE).tolist()
    assert _severe(driver) == []


# --------------------------------------------------------------------------- review loop


@pytest.fixture(scope="module")
def audited_photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A real audit of colour-coded images with one flipped label per class, and a
    class named like markup: (data root, run folder, {flipped source: true class}).
    40 images per class and batches of 16: with 12 per class and 5 single-batch epochs
    the network had not learned the colours and the audit is (rightly) inconclusive."""
    import numpy as np
    from PIL import Image

    import minnorm_audit

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("review") / "photos"
    colours = {"bird": (40, 40, 200), "cat": (200, 40, 40), HOSTILE_CLASS: (40, 200, 40)}
    names = list(colours)
    for name in names:
        (root / name).mkdir(parents=True)
    flips = {}
    for position, (name, colour) in enumerate(colours.items()):
        for index in range(40):
            pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
            folder = names[(position + 1) % 3] if index == 0 else name
            file_name = f"{position}-{index}.png"
            if index == 0:
                flips[f"{folder}/{file_name}"] = name
            Image.fromarray(pixels).save(root / folder / file_name)
    result = minnorm_audit.audit(root, out=root.parent / "run", epochs=10, lr=0.01, batch_size=16, image_size=8, device="cpu",
                                 flag_fraction=0.15)
    return root, result.run_dir, flips


def test_review_decisions_download_and_feed_clean(driver: Any, audited_photos: Any, tmp_path: Path) -> None:
    import hashlib
    import time

    import pandas as pd
    from click.testing import CliRunner
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from minnorm_audit.cli import main

    root, run_dir, flips = audited_photos
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    _open(driver, run_dir / "report.html")
    assert driver.find_element(By.ID, "review-bar").is_displayed()
    download = driver.find_element(By.ID, "review-download")
    assert not download.is_enabled()
    items = {item.get_attribute("data-source"): item for item in driver.find_elements(By.CSS_SELECTOR, "#gallery-items .item")}
    assert set(flips) <= set(items)
    flipped = sorted(flips)
    others = [source for source in items if source not in flips]
    assert len(others) >= 2

    # Relabel one flip to the (hostile-named) class the page offers; keep the other flips...
    target = next(source for source in flipped if flips[source] == HOSTILE_CLASS)
    items[target].find_element(By.CSS_SELECTOR, "button.relabel").click()
    select = Select(items[target].find_element(By.CSS_SELECTOR, "select.relabel-class"))
    assert select.first_selected_option.get_attribute("value") == HOSTILE_CLASS  # the suggestion, preselected
    assert [option.get_attribute("value") for option in select.options] == sorted(["bird", "cat", HOSTILE_CLASS])
    kept = [source for source in flipped if source != target]
    for source in kept:
        items[source].find_element(By.CSS_SELECTOR, "button.keep").click()
    # ...drop one unflagged-by-the-rule example, and change our mind about another.
    items[others[0]].find_element(By.CSS_SELECTOR, "button.drop").click()
    undone = items[others[1]].find_element(By.CSS_SELECTOR, "button.drop")
    undone.click()
    undone.click()
    assert undone.get_attribute("aria-pressed") == "false"
    status = driver.find_element(By.ID, "review-status").text
    assert status == f"{len(kept) + 2} decisions: {len(kept)} keep, 1 drop, 1 relabel"

    download.click()
    # Chromium may show the final name before the bytes land: wait for a finished,
    # non-empty file whose size has stopped changing.
    files: list[Path] = []
    last_size = -1
    for _ in range(200):
        names = list(downloads.iterdir())
        files = [path for path in names if not path.name.endswith(".crdownload")]
        size = files[0].stat().st_size if len(files) == 1 else -1
        if files and len(files) == len(names) and size > 0 and size == last_size:
            break
        last_size = size
        time.sleep(0.1)
    assert [path.name for path in files] == [f"decisions-{run_dir.name}.csv"]
    decisions = pd.read_csv(files[0], dtype=str, keep_default_na=False)
    assert list(decisions.columns) == ["source", "decision", "label"]
    assert dict(zip(decisions["source"], decisions["decision"])) == {
        target: "relabel", others[0]: "drop", **{source: "keep" for source in kept}
    }
    assert _severe(driver) == []

    # The downloaded decisions drive `clean`; the rule drops the other mislabeled examples.
    data_before = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(root.rglob("*.png")))).hexdigest()
    out = tmp_path / "cleaned.csv"
    result = CliRunner().invoke(main, ["clean", str(run_dir), "--out", str(out), "--decisions", str(files[0])])
    assert result.exit_code == 0, result.output
    trail = pd.read_csv(out.with_name("cleaned.trail.csv"), dtype=str, keep_default_na=False).set_index("source")
    assert trail.loc[target, ["action", "label", "decided_by"]].tolist() == ["relabeled", HOSTILE_CLASS, "reviewer"]
    for source in kept:
        assert trail.loc[source, ["action", "decided_by"]].tolist() == ["kept", "reviewer"]
    assert trail.loc[others[0], ["action", "decided_by"]].tolist() == ["dropped", "reviewer"]
    assert trail.loc[others[1], "decided_by"] == "rule"
    manifest = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("source")
    assert manifest.loc[target, "label"] == HOSTILE_CLASS and others[0] not in manifest.index
    assert hashlib.sha256(b"".join(path.read_bytes() for path in sorted(root.rglob("*.png")))).hexdigest() == data_before


def test_not_learned_class_and_plain_summary_on_screen(driver: Any, make_run_folder: Any) -> None:
    from selenium.webdriver.common.by import By

    from conftest import NOT_LEARNED_CLASS

    folder, contents = make_run_folder("browser-table", kind="table")
    _open(driver, render_report(folder))
    plain = driver.find_element(By.ID, "plain-summary")
    assert plain.is_displayed()
    counts = contents["summary"]["counts"]
    assert f"{len(contents['examples'])} examples, {counts['mislabeled']} look mislabeled" in plain.text
    assert "Next step:" in plain.text
    finding = driver.find_element(By.CSS_SELECTOR, f'.not-learned[data-class="{NOT_LEARNED_CLASS}"]')
    assert finding.is_displayed()
    assert finding.text.startswith(f"Class {NOT_LEARNED_CLASS} not learned: its")
    # Beside the verdict, above the fold: the fit figures with the inconclusive lines.
    figures = driver.find_element(By.ID, "fit-figures")
    assert figures.is_displayed() and "inconclusive below 50%" in figures.text
    assert figures.location["y"] < 1000
    row = driver.find_element(By.CSS_SELECTOR, f'#per-class tr[data-class="{NOT_LEARNED_CLASS}"]')
    assert "not learned: not judged" in row.text.lower()
    assert _severe(driver) == []
