"""Every cell besides the LSTM, end to end as a user runs it: train (Ctrl-C, then a resume that
ends where an uninterrupted run does), generate, evaluate, inspect its own gates, export a step
that onnxruntime runs, and the page colouring the text by its gates. (The LSTM has these tests
of its own throughout the suite.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lstmlm import cells
from lstmlm.export import load_runtime, read_metadata
from lstmlm.inference import load as load_trained

from support.browser import chromium
from support.cli import cli
from support.serving import http_json
from support.tiny import synthetic_text

OTHERS = [name for name in cells.NAMES if name != cells.DEFAULT]
TINY = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu", "--optimizer", "adam", "--lr", "0.02"]


@pytest.fixture(scope="module", params=OTHERS)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(cell, runs directory, corpus): a 2-layer run of the cell, 3 epochs."""
    cell = request.param
    root = tmp_path_factory.mktemp(f"{cell}-run")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_text(80), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        done = cli("train", "--corpus", corpus, "--normalize", "raw", "--runs-dir", root / "runs", "--run", cell, "--cell", cell,
                   "--layers", "2", "--epochs", "3", *TINY, "--json")  # fmt: skip
    assert done.code == 0, done.stderr
    started = next(e for e in done.json() if e["event"] == "epoch")
    assert started["epoch"] == 1
    return cell, root / "runs", corpus


def test_the_run_records_its_cell_and_learns(trained: tuple[str, Path, Path]) -> None:
    cell, runs, _ = trained
    config = json.loads((runs / cell / "config.json").read_text())
    assert config["model"]["cell"] == cell
    metrics = [json.loads(line) for line in (runs / cell / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_perplexity"] < metrics[0]["train_perplexity"]
    model = load_trained(runs, cell).model
    assert model.cell.name == cell and len(model.begin_state(1)) == len(model.cell.state)


def test_generate_and_evaluate(trained: tuple[str, Path, Path]) -> None:
    cell, runs, _ = trained
    base = ["--runs-dir", runs, "--run", cell]
    generated = cli("generate", *base, "--prefix", "the", "--length", "40")
    assert generated.code == 0 and len(generated.stdout.rstrip("\n")) == 43
    sampled = cli("generate", *base, "--prefix", "the", "--length", "40", "--temperature", "1", "--num-samples", "3", "--seed", "4")
    assert sampled.code == 0 and len(sampled.stdout.strip().splitlines()) >= 3
    evaluated = cli("evaluate", *base, "--part", "val", "--json")
    assert evaluated.code == 0
    last = [json.loads(line) for line in (runs / cell / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads(evaluated.stdout)["perplexity"] == pytest.approx(last["val_perplexity"], rel=1e-4)


def test_inspect_shows_the_cells_own_gates(trained: tuple[str, Path, Path], tmp_path: Path) -> None:
    cell, runs, _ = trained
    own = [g.name for g in cells.get(cell).gates]
    base = ["inspect", "--runs-dir", runs, "--run", cell, "--text", "the time traveller"]
    shown = cli(*base, "--gate", own[0], "--html", tmp_path / "page.html")
    assert shown.code == 0 and "layer 1 unit" in shown.stdout and own[0] in shown.stdout
    page = (tmp_path / "page.html").read_text()
    assert all(f'"{name}"' in page for name in own)
    refused = cli(*base, "--gate", "forget")
    assert refused.code == 1 and f"the {cells.get(cell).title} has no gate 'forget'" in refused.stderr


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_runs_the_cells_step_in_its_runtime(trained: tuple[str, Path, Path], tmp_path: Path, format: str) -> None:
    cell, runs, _ = trained
    path = tmp_path / f"{cell}.{format}"
    done = cli("export", "--runs-dir", runs, "--run", cell, "--format", format, "-o", path)
    assert done.code == 0, done.stderr
    meta = read_metadata(path, format)
    assert meta["cell"] == cell and meta["inputs"] == ["ids", *cells.get(cell).state]
    run = load_runtime(path, format, tuple(meta["inputs"][1:]))
    model = load_trained(runs, cell).model
    ids = torch.randint(len(meta["tokens"]), (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, _ = model(ids)
    state = [np.zeros((2, 2, 16), dtype=np.float32) for _ in cells.get(cell).state]
    for t in range(12):
        logits, *state = run(ids[:, t].numpy(), *state)
        np.testing.assert_allclose(logits, expected[:, t].numpy(), atol=1e-4)


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(trained: tuple[str, Path, Path], tmp_path: Path) -> None:
    """A real SIGINT mid-training; the printed command continues it; the weights are the
    uninterrupted run's, bitwise."""
    cell, _, corpus = trained
    runs = tmp_path / "runs"
    common = [sys.executable, "-m", "lstmlm", "train", "--corpus", str(corpus), "--normalize", "raw", "--runs-dir", str(runs),
              "--cell", cell, *TINY, "--checkpoint-every", "7", "--seed", "5"]  # fmt: skip
    # the uninterrupted run beside the one stopped: two processes on the two cores, each run's bits its own
    straight = subprocess.Popen([*common, "--run", "straight", "--epochs", "6", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped = subprocess.Popen([*common, "--run", "stopped", "--epochs", "6", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert stopped.stdout is not None
    for line in stopped.stdout:  # the first epoch is done: stop inside the second
        if '"event": "epoch"' in line:
            break
    time.sleep(0.2)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signal.SIGINT, err
    _, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err
    command = err.split("continue with: ")[1].strip()
    assert "--resume" in command and "--run stopped" in command
    resumed = subprocess.run([sys.executable, "-m", "lstmlm", *command.split()[1:]], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(runs / "straight" / "latest.pt", weights_only=True)["model"]
    b = torch.load(runs / "stopped" / "latest.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_page_colours_the_text_by_the_cells_gates(trained: tuple[str, Path, Path], tmp_path: Path, serve_process: Any) -> None:
    driver = chromium(tmp_path / "profile")  # or a skip, saying what is missing
    from selenium.webdriver.support.ui import Select, WebDriverWait

    cell, runs, _ = trained
    try:
        server = serve_process("--runs-dir", runs)
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        wait.until(lambda d: [o.get_attribute("value") for o in Select(d.find_element("id", "run")).options] == [cell])
        Select(driver.find_element("id", "run")).select_by_value(cell)
        wait.until(lambda d: d.find_element("id", "run-info").text.startswith(f"{cell} scratch, 2 × 16 hidden"))
        prefix = driver.find_element("id", "prefix")
        prefix.clear()
        prefix.send_keys("the time")
        driver.find_element("id", "go").click()
        wait.until(lambda d: "ended it" in d.find_element("id", "status").text)
        own = [g.name for g in cells.get(cell).gates]
        wait.until(lambda d: [o.get_attribute("value") for o in Select(d.find_element("id", "gate")).options] == own)
        gate = own[1] if len(own) > 1 else own[0]
        Select(driver.find_element("id", "gate")).select_by_value(gate)
        text = str(driver.execute_script("return Array.from(document.getElementById('output').children).map((s) => s.textContent).join('')"))
        unit = int(driver.find_element("id", "unit").get_attribute("value"))
        answer = http_json(server.url + "/api/inspect", {"run": cell, "text": text, "gate": gate, "units": [unit]})[1]
        expected = ["rgb({}, {}, {})".format(*(int(c[i : i + 2], 16) for i in (1, 3, 5))) for c in answer["units"][0]["colours"]]
        painted = "return Array.from(document.getElementById('output').children).map((s) => getComputedStyle(s).backgroundColor)"
        wait.until(lambda d: d.execute_script(painted) == expected)
        assert Select(driver.find_element("id", "gate")).first_selected_option.get_attribute("value") == gate  # the choice stays
    finally:
        driver.quit()
