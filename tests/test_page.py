"""The page `lstmlm serve` serves, in a real browser: Debian's chromium and chromium-driver,
driven by Selenium, headless, against a real server process. A prefix typed in streams the
text the API gives for the same settings; every character carries the colour /api/inspect
gives it; hovering shows the units strongest there; the chart draws the run's epochs and
follows a training that writes more; the console stays free of errors. A screenshot is kept
in the test's temporary directory.

Skipped, saying why, where chromium, chromedriver or selenium is missing (`.ci/run` installs
them: apt-get install chromium chromium-driver)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.browser import chromium
from support.cli import cli
from support.serving import ServeProcess, http_json

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SETTINGS = {"run": "raw", "prefix": "the", "length": 1200, "temperature": 1.0, "top_p": 0.95, "seed": 7}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = chromium(tmp_path / "chromium-profile", "--window-size=1400,950", logs=True)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)))


def shown_text(driver: Any) -> str:
    return str(driver.execute_script("return Array.from(document.getElementById('output').children).map((s) => s.textContent).join('')"))


def test_the_page_streams_colours_charts_and_follows_training(tiny_runs: Path, tmp_path: Path, serve_process: Any, browser: Any) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    server: ServeProcess = serve_process("--runs-dir", runs)
    driver, wait = browser, WebDriverWait(browser, 60)
    driver.get(server.url + "/")
    assert driver.title == "lstmlm"
    wait.until(lambda d: len(Select(d.find_element(By.ID, "run")).options) == 2)
    Select(driver.find_element(By.ID, "run")).select_by_value("raw")

    # ---- a prefix typed in, the sliders set, the text streamed ----
    for field, value in (("prefix", "the"), ("length", "1200"), ("seed", "7")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.execute_script("const t = document.getElementById('temperature'); t.value = '1'; t.dispatchEvent(new Event('input'))")
    assert driver.find_element(By.ID, "temperature-value").text == "1.00"
    assert driver.find_element(By.ID, "top-p-value").text == "0.95"
    driver.execute_script(  # count the times text is appended to the output as it streams in
        "window.appends = 0; new MutationObserver((records) => { window.appends += records.filter((r) => r.addedNodes.length).length })"
        ".observe(document.getElementById('output'), {childList: true})"
    )
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: "ended it" in d.find_element(By.ID, "status").text)
    expected = http_json(server.url + "/api/generate", {**SETTINGS, "stream": False})[1]
    assert shown_text(driver) == expected["prefix"] + expected["text"]
    assert driver.execute_script("return window.appends") >= 1 + 1200 // 512  # the prefix, then event after event

    # ---- every character coloured as /api/inspect colours it ----
    text = shown_text(driver)
    wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-painted") == str(len(text)))
    unit = int(driver.find_element(By.ID, "unit").get_attribute("value"))
    answer = http_json(server.url + "/api/inspect", {"run": "raw", "text": text, "gate": "cell", "layer": 1, "units": [unit]})[1]
    colours = answer["units"][0]["colours"]
    painted = driver.execute_script("return Array.from(document.getElementById('output').children).map((s) => getComputedStyle(s).backgroundColor)")
    assert painted == [rgb(c) for c in colours] and len(set(colours)) > 10

    # ---- hovering a character shows the units strongest there; choosing one recolours ----
    span = driver.find_elements(By.CSS_SELECTOR, "#output > span")[10]
    ActionChains(driver).move_to_element(span).perform()
    hover = driver.find_element(By.ID, "hover")
    wait.until(lambda d: hover.text.startswith("step 10 "))
    links = hover.find_elements(By.TAG_NAME, "a")
    assert [int(a.text.split(" ")[0]) for a in links] == [u for u, _ in answer_top(server, text, 10)]
    other = next(a for a in links if int(a.text.split(" ")[0]) != unit)
    other.click()
    chosen = int(other.text.split(" ")[0])
    wait.until(lambda d: d.find_element(By.ID, "unit").get_attribute("value") == str(chosen))
    recoloured = http_json(server.url + "/api/inspect", {"run": "raw", "text": text, "gate": "cell", "layer": 1, "units": [chosen]})[1]
    wait.until(lambda d: d.execute_script("return getComputedStyle(document.querySelector('#output > span')).backgroundColor")
               == rgb(recoloured["units"][0]["colours"][0]))  # fmt: skip

    # ---- the chart draws the epochs, and follows a training that adds more ----
    chart = driver.find_element(By.ID, "chart")
    wait.until(lambda d: chart.get_attribute("data-points") == "6")  # 3 epochs, train and validation
    assert ink(driver) > 500
    resume = ["train", "--resume", "--run", "raw", "--runs-dir", str(runs), "--epochs", "4", "--json"]
    subprocess.run([sys.executable, "-m", "lstmlm", *resume], check=True, capture_output=True, timeout=300)  # a real training, one epoch more
    wait.until(lambda d: d.find_element(By.ID, "chart-info").text.startswith("4 epochs"))
    assert chart.get_attribute("data-points") == "8"

    # ---- validations within an epoch (a long one's) are points of their own ----
    from lstmlm.runs import RunStore

    store = RunStore.open(runs / "raw")
    for step, epoch in ((10_001, 4.25), (10_002, 4.5)):
        store.append_metrics({"epoch": epoch, "global_step": step, "train_perplexity": 9.0, "val_perplexity": 9.5})
    wait.until(lambda d: d.find_element(By.ID, "chart-info").text.startswith("4 epochs (and 2 validations within an epoch) · "))
    assert chart.get_attribute("data-points") == "12"
    store.append_metrics({"epoch": 5, "global_step": 10_003, "train_perplexity": 8.9, "val_perplexity": 9.5})  # carries the last validation
    wait.until(lambda d: d.find_element(By.ID, "chart-info").text.startswith("5 epochs"))
    assert chart.get_attribute("data-points") == "13"  # its training point; the validation is drawn once

    screenshot = tmp_path / "lstmlm-serve-page.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    print(f"screenshot: {screenshot}")
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def answer_top(server: ServeProcess, text: str, t: int) -> list[list[float]]:
    answer = http_json(server.url + "/api/inspect", {"run": "raw", "text": text, "gate": "cell", "layer": 1, "units": [0], "top": 6})[1]
    return list(answer["top"][t])


def ink(driver: Any) -> int:
    """How many of the chart's pixels are not white: something was drawn."""
    return int(driver.execute_script(
        "const c = document.getElementById('chart'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++; return n"
    ))  # fmt: skip


def test_the_page_says_so_when_there_is_no_run(tmp_path: Path, serve_process: Any, browser: Any) -> None:
    (tmp_path / "empty").mkdir()
    server: ServeProcess = serve_process("--runs-dir", tmp_path / "empty")
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "No runs" in d.find_element(By.ID, "status").text)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_characters_outside_the_bmp_are_counted_and_coloured_one_each(tmp_path: Path, serve_process: Any, browser: Any) -> None:
    """An emoji is two UTF-16 units in JavaScript: the status counted "51 characters" for 40,
    while the spans (one a code point) and their colours stay one per character."""
    corpus = tmp_path / "emoji.txt"
    corpus.write_text("😀 ab 𝔘𝔫 👨\u200d👩 cd\n" * 150, encoding="utf-8")
    train = ["train", "--corpus", corpus, "--runs-dir", tmp_path / "runs", "--run", "emoji", "--hidden", "16", "--batch-size", "8",
             "--num-steps", "10", "--epochs", "1", "--device", "cpu"]  # fmt: skip
    assert cli(*train).code == 0
    server: ServeProcess = serve_process("--runs-dir", tmp_path / "runs")
    driver, wait = browser, WebDriverWait(browser, 60)
    driver.get(server.url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "run")).options) == 1)
    for field, value in (("prefix", "😀"), ("length", "40"), ("seed", "1"), ("temperature", "1")):  # chromedriver types no astral character
        driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('input'))", field, value)
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: "ended it" in d.find_element(By.ID, "status").text)
    assert driver.find_element(By.ID, "status").text == "40 characters (the length asked for ended it)"
    text = shown_text(driver)
    assert len(text) == 41 and any(ord(c) > 0xFFFF for c in text[1:])
    wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-painted") == "41")
    unit = int(driver.find_element(By.ID, "unit").get_attribute("value"))
    answer = http_json(server.url + "/api/inspect", {"run": "emoji", "text": text, "units": [unit]})[1]
    painted = driver.execute_script("return Array.from(document.getElementById('output').children).map((s) => getComputedStyle(s).backgroundColor)")
    assert painted == [rgb(c) for c in answer["units"][0]["colours"]]
