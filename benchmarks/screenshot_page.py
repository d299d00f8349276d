"""A screenshot of `lstmlm serve`'s page on a trained run, for the README.

    python benchmarks/screenshot_page.py --runs-dir runs --run shakespeare --prefix "ROMEO:" -o docs/serve-page.png

Starts `lstmlm serve` on a free loopback port, opens the page in headless Chromium (Debian's
chromium and chromium-driver, through Selenium, as tests/test_page.py does), picks the run,
types the prefix, sets temperature and seed, generates, waits for the colours, hovers a
character in the middle so the strongest units show, and saves the window as a PNG.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

from browser import headless_chromium
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def start_server(runs_dir: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "lstmlm", "serve", "--runs-dir", runs_dir, "--port", "0"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("serving the runs"):
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split(" at ")[1].split(" ")[0]
    raise SystemExit(f"lstmlm serve did not start (exit code {proc.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", required=True)
    parser.add_argument("--prefix", default="ROMEO:")
    parser.add_argument("--length", type=int, default=600)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("-o", "--output", type=Path, default=Path("serve-page.png"))
    args = parser.parse_args()

    proc, url = start_server(args.runs_dir)
    try:
        with headless_chromium(args.width, args.height) as driver:
            wait = WebDriverWait(driver, 120)
            driver.get(url)
            wait.until(lambda d: any(o.get_attribute("value") == args.run for o in Select(d.find_element(By.ID, "run")).options))
            Select(driver.find_element(By.ID, "run")).select_by_value(args.run)
            for field, value in (("prefix", args.prefix), ("length", str(args.length)), ("seed", str(args.seed))):
                element = driver.find_element(By.ID, field)
                element.clear()
                element.send_keys(value)
            driver.execute_script(
                "const t = document.getElementById('temperature'); t.value = arguments[0]; t.dispatchEvent(new Event('input'))", str(args.temperature)
            )
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: "ended it" in d.find_element(By.ID, "status").text)
            spans = driver.find_elements(By.CSS_SELECTOR, "#output > span")
            wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-painted") == str(len(spans)))
            ActionChains(driver).move_to_element(spans[len(spans) // 3]).perform()
            wait.until(lambda d: "strongest here" in d.find_element(By.ID, "hover").text)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.output))
            print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
