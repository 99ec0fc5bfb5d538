"""The page as a person uses it: headless Chromium (Playwright) uploads, clicks, reads.

Needs Debian's Chromium at /usr/bin/chromium (scripts/install-test-tools). Screenshots go to
the test's tmp folder; set APP_SCREENSHOT=path to keep a copy of the result page there
(docs/screenshot.png is made that way).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import imaging
from serve.predictor import Predictor

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 60_000  # the machine is shared and slow; nothing here is a timing assertion


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (run scripts/install-test-tools)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def upload_and_classify(page, url: str, path: Path, accepted: bool = True) -> None:
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(str(path))
    if accepted:  # the upload has finished once the page shows it
        page.locator("#image img").first.wait_for(state="attached")
    page.locator("#classify").click()


def shown_top(prediction) -> str:
    """What a model's "Top class" box says: the class, or that it is unsure of its best guess."""
    return f"unsure (best guess: {prediction.top_class})" if prediction.unsure else prediction.top_class


def test_upload_classify_shows_every_model(page, app_url, exported_models, tmp_path):
    from playwright.sync_api import expect

    manifest = json.loads((exported_models / "manifest.json").read_text())
    example = exported_models / manifest["examples"][0]  # named after its class, e.g. checks_1.png
    classes = manifest["models"][0]["class_names"]
    assert example.stem.rsplit("_", 1)[0] in classes
    upload_and_classify(page, app_url, example)

    image = imaging.load_rgb(example)
    for entry in manifest["models"]:
        expected_top = shown_top(Predictor(exported_models / entry["file"]).predict(image))
        column = page.locator(f"#model-{entry['name']}")
        expect(column).to_contain_text(entry["display_name"])
        expect(page.locator(f"#top-{entry['name']} textarea")).to_have_value(expected_top)
        probs = page.locator(f"#probs-{entry['name']}")
        for name in classes:  # every class is listed with a percentage
            expect(probs).to_contain_text(name)
        assert len(re.findall(r"\d+(?:\.\d+)?%", probs.inner_text())) == len(classes)
        expect(page.locator(f"#ms-{entry['name']} textarea")).to_have_value(re.compile(r"^\d+\.\d ms$"))
    expect(page.locator("#verdict")).to_contain_text(re.compile(r"agree|disagree|unsure"))
    expect(page.locator("#verdict")).to_contain_text("FP32")
    # Under each model, the image with that model's heatmap over it.
    overlays = [page.locator(f"#heat-{entry['name']} img") for entry in manifest["models"]]
    sources = []
    for overlay in overlays:
        expect(overlay).to_be_visible()
        sources.append(overlay.get_attribute("src"))
    assert len(sources) == 3 and all(sources)
    # Another class for all three at once (what is drawn is checked in test_app.py): the
    # pictures come back, with no error.
    page.locator("#heatmap-class input").click()
    page.get_by_role("option", name=classes[-1], exact=True).click()
    page.wait_for_load_state("networkidle")
    for overlay in overlays:
        expect(overlay).to_be_visible()
    expect(page.locator(".toast-body")).to_have_count(0)

    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["APP_SCREENSHOT"])


def test_non_image_upload_shows_a_readable_error(page, app_url, tmp_path):
    from playwright.sync_api import expect

    fake = tmp_path / "holiday.jpg"  # an image's name, but text inside: the server must refuse it
    fake.write_text("these are not the pixels you are looking for\n")
    upload_and_classify(page, app_url, fake)
    expect(page.locator(".toast-body")).to_contain_text(
        "Cannot classify this file: not an image file in an accepted format")
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

    notes = tmp_path / "notes.txt"  # the page itself refuses other file types, also readably
    notes.write_text("hello\n")
    upload_and_classify(page, app_url, notes, accepted=False)
    expect(page.locator(".toast-body").first).to_contain_text("Invalid file type")


def test_clicking_an_example_classifies_it(page, app_url, exported_models):
    from playwright.sync_api import expect

    manifest = json.loads((exported_models / "manifest.json").read_text())
    example = exported_models / manifest["examples"][-1]
    page.goto(app_url)
    page.get_by_text(example.stem, exact=True).click()
    page.locator("#image img").first.wait_for(state="attached")
    page.locator("#classify").click()
    expected = shown_top(Predictor(exported_models / manifest["models"][0]["file"]).predict_file(example))
    expect(page.locator(f"#top-{manifest['models'][0]['name']} textarea")).to_have_value(expected)


def test_an_ambiguous_image_is_shown_as_unsure(page, app_url, exported_models, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    ambiguous = tmp_path / "grey.png"  # no pattern at all: every class equally (un)likely
    Image.new("RGB", (96, 96), (128, 128, 128)).save(ambiguous)
    manifest = json.loads((exported_models / "manifest.json").read_text())
    image = imaging.load_rgb(ambiguous)
    answers = {e["name"]: Predictor(exported_models / e["file"]).predict(image) for e in manifest["models"]}
    unsure = [name for name, a in answers.items() if a.unsure]
    assert unsure, "the test needs a model below its threshold for this image"
    upload_and_classify(page, app_url, ambiguous)
    for name, answer in answers.items():
        expect(page.locator(f"#top-{name} textarea")).to_have_value(shown_top(answer))
        probs = page.locator(f"#probs-{name}")  # the probabilities stay visible
        expect(probs).to_contain_text(answer.top_class)
    count = len(unsure)
    expected = ("models are unsure" if count == len(answers) else
                f"{count} {'is' if count == 1 else 'are'} unsure")
    expect(page.locator("#verdict")).to_contain_text(expected)
