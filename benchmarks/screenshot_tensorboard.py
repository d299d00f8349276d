"""A screenshot of TensorBoard on a run logged with `lstmlm train --tensorboard DIR`, for the README.

    python benchmarks/screenshot_tensorboard.py --logdir tb --tags bpc/val --full-width --width 1200 --height 800 \
        --scale 0.75 --colours 128 -o docs/tensorboard.png

Starts `tensorboard --logdir DIR` on a free loopback port, opens its scalars (the Time Series
dashboard) in headless Chromium (Debian's chromium and chromium-driver, through Selenium, as
tests/test_page.py does), filters the tags by --tags, closes the settings (smoothing stays at
TensorBoard's 0.6: the faint line is the points as logged), and saves the window, scaled to
--scale and reduced to a palette so that it stays small.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from browser import headless_chromium
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_tensorboard(logdir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "data/runs", timeout=2) as answer:
                if answer.status == 200 and answer.read() != b"[]":
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("tensorboard did not start, or found no runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="tb")
    parser.add_argument("--tags", default="bpc", help="a regex of the tags to show")
    parser.add_argument("--full-width", action="store_true", help="the first chart at the page's full width")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=820)
    parser.add_argument("--scale", type=float, default=0.64, help="the saved image's size, as a fraction of the window's")
    parser.add_argument("--colours", type=int, default=64, help="the palette's size")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds to let the charts draw once they are there")
    parser.add_argument("-o", "--output", type=Path, default=Path("tensorboard.png"))
    args = parser.parse_args()

    proc, url = start_tensorboard(args.logdir)
    try:
        with headless_chromium(args.width, args.height, "--disable-quic") as driver:
            driver.get(f"{url}?darkMode=false#timeseries")
            wait = WebDriverWait(driver, 180)
            tags = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Filter tags (regex)']"))
            time.sleep(args.settle)  # the runs and their tags load after the page
            tags.send_keys(args.tags)
            driver.find_element(By.CSS_SELECTOR, "button[aria-label='Close side pane']").click()
            if args.full_width:
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Toggle full size mode']"))[0].click()
            time.sleep(args.settle)
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
            size = (round(shot.width * args.scale), round(shot.height * args.scale))
            small = shot.resize(size, Image.Resampling.LANCZOS).quantize(colors=args.colours, method=Image.Quantize.MEDIANCUT)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            small.save(args.output, optimize=True)
            print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes, {size[0]}×{size[1]})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
