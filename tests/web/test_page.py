"""The demo page: served at `/`, and driven in a real headless Chromium (slow tests).

The browser tests use Debian's chromium, not a browser downloaded by Playwright, so that
nothing is fetched at run time beyond the distribution's own package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).parents[2]
STATIC = ROOT / "service" / "static"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REASONS = {"deepest", "deadline", "confident", "load"}


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process; ASGITransport runs no lifespan, so no bundle is loaded."""
    transport = httpx.ASGITransport(app=create_app(Settings(model_path=tmp_path)))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_page_and_samples_are_served(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert f'"{asset}"' in page.text
        assert (await http.get(asset)).status_code == 200
    index = (await http.get("/static/samples/index.json")).json()
    assert len(index["samples"]) >= 10
    assert len({s["label"] for s in index["samples"]}) >= 8
    for sample in index["samples"]:
        assert (STATIC / "samples" / sample["file"]).is_file()
        assert sample["file"].startswith(f"{sample['label']}_")
        image = await http.get(f"/static/samples/{sample['file']}")
        assert image.status_code == 200
        assert image.content[:2] == b"\xff\xd8"  # JPEG


def test_samples_index_matches_the_folder() -> None:
    index = json.loads((STATIC / "samples" / "index.json").read_text())
    listed = {s["file"] for s in index["samples"]}
    assert listed == {p.name for p in (STATIC / "samples").glob("*.jpg")}


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when it is missing (else the test skips)."""
    if CHROMIUM.is_file():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "chromium"],
            env=env,
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install -y chromium` failed: {exc}")
    if not CHROMIUM.is_file():
        pytest.skip(f"`apt-get install -y chromium` did not provide {CHROMIUM}")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = ensure_chromium()
    with sync_api.sync_playwright() as playwright:
        # launch() gives every run a new, empty profile directory.
        chromium = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def watch_console(page: Any) -> list[str]:
    """Console errors and uncaught exceptions of `page`, as they happen."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    return problems


@pytest.mark.slow
def test_progressive_answers_in_the_browser(browser: Any, server_url: str) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = watch_console(page)
    page.goto(f"{server_url}/")
    expect(page.locator("#model-card")).to_contain_text("tiny")
    expect(page.locator("#model-card tbody tr").first).to_be_visible()

    # Keyboard only: arrow keys pick a sample, End sets the longest deadline, Enter submits.
    page.locator("#sample-0").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#sample-1")).to_be_checked()
    expect(page.locator("#preview-caption")).to_contain_text("automobile_0006.jpg")
    page.locator("#deadline").focus()
    page.keyboard.press("End")
    expect(page.locator("#deadline-value")).to_have_text("500 ms")
    page.locator("#submit").focus()
    page.keyboard.press("Enter")

    answers = page.locator("#answers > li")
    final = page.locator("#answers > li[data-final='true']")
    final.wait_for(timeout=30_000)
    columns = [int(c) for c in answers.evaluate_all("items => items.map(i => i.dataset.column)")]
    assert len(columns) >= 2, columns
    assert columns[0] == 1
    assert columns == sorted(set(columns)), "answers must arrive in increasing column order"
    assert int(final.get_attribute("data-column") or 0) == columns[-1]
    expect(final.locator(".badge")).to_be_visible()

    summary = page.locator("#final")
    expect(summary).to_be_visible()
    assert summary.locator(".reason").get_attribute("data-reason") in REASONS
    expect(summary).to_contain_text(f"Columns run: {', '.join(map(str, columns))}.")
    expect(summary).to_contain_text("True label: automobile")
    # Every answer has a bar on the deadline-scaled timeline, inside the live region.
    widths = answers.locator(".track .bar").evaluate_all("bars => bars.map(b => b.style.width)")
    assert len(widths) == len(columns) and all(w.endswith("%") for w in widths)
    assert page.locator("[aria-live] #answers").count() == 1
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#submit")).to_be_enabled()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        "the page must not scroll sideways on a phone"
    )
    page.screenshot(path=str(ARTIFACTS / "web-page-phone.png"), full_page=True)
    assert problems == []
    page.close()


@pytest.mark.slow
def test_uploads_and_errors(browser: Any, server_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(f"{server_url}/")
    error = page.locator("#error")
    classify = page.get_by_role("button", name="Classify")

    classify.click()
    expect(error).to_contain_text("Pick a sample or upload an image first.")

    # An upload through the file picker, without a deadline: the stream runs to the end.
    mine = tmp_path / "mine.jpg"
    mine.write_bytes((STATIC / "samples" / "horse_0013.jpg").read_bytes())
    page.get_by_label("Upload an image").set_input_files(str(mine))
    expect(page.locator("#preview-caption")).to_have_text("mine.jpg")
    page.get_by_label("No deadline").check()
    expect(page.locator("#deadline")).to_be_disabled()
    classify.click()
    expect(page.locator("#final .reason")).to_have_attribute("data-reason", "deepest")
    expect(error).to_be_hidden()

    # A file dropped on the page that is no image: the server's 400 JSON error is shown.
    dropped = page.evaluate_handle(
        """() => {
            const files = new DataTransfer();
            files.items.add(new File(["not a png"], "broken.png", {type: "image/png"}));
            return files;
        }"""
    )
    page.locator("#drop-zone").dispatch_event("drop", {"dataTransfer": dropped})
    expect(page.locator("#preview-caption")).to_have_text("broken.png")
    classify.click()
    expect(error).to_contain_text("The server answered 400: ")
    expect(page.locator("#answers > li")).to_have_count(0)

    # A bad minimum confidence is caught before anything is sent.
    page.get_by_label("Minimum confidence").fill("2")
    classify.click()
    expect(error).to_contain_text("from 0 to 1")
    expect(page.get_by_label("Minimum confidence")).to_have_attribute("aria-invalid", "true")
    page.close()


@pytest.mark.slow
def test_event_stream_parser(browser: Any) -> None:
    page = browser.new_page()
    page.set_content("<!doctype html><title>parser</title>")
    page.add_script_tag(path=str(STATIC / "app.js"))
    # Chunks split inside a CRLF and inside a data line, a comment, a multi-line data
    # field, and a last event without its blank line.
    events = page.evaluate(
        """() => {
            const got = [];
            const parser = createSseParser((type, data) => got.push([type, data]));
            for (const chunk of ['event: prediction\\r', '\\ndata: {"a":', ' 1}\\r\\n\\r\\n',
                                 ': keep-alive\\n', 'data: x\\ndata: y\\n\\n',
                                 'event: done\\ndata: z']) parser.push(chunk);
            parser.end();
            return got;
        }"""
    )
    assert events == [["prediction", '{"a": 1}'], ["message", "x\ny"], ["done", "z"]]
    page.close()
