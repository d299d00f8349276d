"""benchmarks/gpu_check.py keeps working where CI has no GPU: `--dry` runs every part at toy sizes
on the CPU and skips, saying why, what needs CUDA; the targets are judged from the rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_dry_run_on_a_cpu_runs_every_part_and_skips_what_needs_cuda(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--corpus", str(corpus_file), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    by_part: dict[str, list[dict]] = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    assert list(by_part) == ["tests", "d2l", "speed", "generate", "torchrun", "target"]
    assert by_part["tests"][0]["note"] == "skipped: --dry"
    d2l = {r["measure"]: r for r in by_part["d2l"]}
    assert {m for m, r in d2l.items() if r["note"] == "skipped: no CUDA GPU here"} == {"d2l 1 epochs scratch cuda", "d2l 1 epochs cudnn cuda"}
    assert all(d2l[f"d2l 1 epochs {core} cpu"]["value"] > 1 for core in ("scratch", "cudnn"))  # a perplexity
    trained = [r for r in by_part["speed"] if r["measure"].startswith("train")]
    assert {(r["measure"], r["precision"]) for r in trained} == {(f"train toy {c}", p) for c in ("scratch", "cudnn") for p in ("fp32", "bf16")}
    assert all(r["value"] > 0 for r in trained + by_part["generate"] + by_part["torchrun"])
    assert len(by_part["generate"]) == 4
    assert all(r["note"] == "not measured" for r in by_part["target"])  # none of the targets' rows is made by a dry run
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check --dry:") and lines[1].split()[:2] == ["part", "measure"]  # one table: a title, a header,
    assert len(lines) == 2 + len(rows) + 1 and lines[-1] == f"written: {out}"  # a line a row, where it went


def test_without_a_gpu_and_without_dry_it_says_so_and_stops(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    if "no CUDA GPU here" not in done.stderr:
        pytest.skip("this machine has a GPU")
    assert done.returncode != 0 and not (tmp_path / "x.json").exists()


def test_the_targets_are_judged_from_the_rows() -> None:
    check = gpu_check()
    Row = check.Row
    rows = [
        Row("d2l", "d2l 100 epochs scratch cuda", "fp32", 1.31), Row("d2l", "d2l 100 epochs scratch cpu", "fp32", 1.30),
        Row("d2l", "d2l 100 epochs cudnn cuda", "fp32", 1.40), Row("d2l", "d2l 100 epochs cudnn cpu", "fp32", 1.30),
        Row("speed", "train d2l cudnn", "fp32", 1.2e6), Row("speed", "train d2l scratch", "fp32", 0.5e6),
        Row("speed", "train 512×2 cudnn", "bf16", 1.4e6),
        Row("speed", "train 1024×2 b256 cudnn", "bf16", 2e6, of_peak=0.2),
    ]  # fmt: skip
    judged = {r.measure: r.note for r in check.targets(rows)}
    assert judged == {
        "d2l perplexity scratch: |CUDA / CPU - 1| ≤ 2%": "met",  # 0.8%
        "d2l perplexity cudnn: |CUDA / CPU - 1| ≤ 2%": "MISSED",  # 7.7%
        "train d2l cudnn fp32 ≥ 1,000,000 tokens/s": "met",
        "train d2l scratch fp32 ≥ 0.5 × cudnn": "MISSED",  # 0.42
        "train 512×2 cudnn bf16 ≥ 1,500,000 tokens/s": "MISSED",
        "train 1024×2 b256 cudnn bf16 ≥ 15% of the bf16 peak": "met",
        "train 1024×2 b256 scratch bf16 ≥ 15% of the bf16 peak": "not measured",
    }


def test_the_bf16_peak_is_the_named_gpus() -> None:
    peak = gpu_check().bf16_peak
    assert peak("NVIDIA H100 PCIe") == 756_000 and peak("NVIDIA H100 80GB HBM3") == 989_400 and peak("NVIDIA H200") == 989_400
    assert peak("NVIDIA A100-SXM4-80GB") == 312_000 and peak("Some Future GPU") is None and peak(None) is None
