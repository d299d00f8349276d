"""`lstmlm export`: the exported one-step model, run by onnxruntime and by TorchScript, gives
lstmlm's logits and state for 200 steps (both cores, 1 and 2 layers, an embedding); it carries
what a loop needs; a greedy loop on it writes `lstmlm generate`'s text; the docs' loop runs;
and a failed export leaves nothing behind."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import shutil
import stat
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lstmlm import export as export_mod
from lstmlm.export import export_model, load_runtime, read_metadata
from lstmlm.vocab import Vocab

from support.cli import assert_one_error_line, cli, lstmlm_process
from support.faults import fill
from support.references import assert_close
from support.tiny import lively_model, synthetic_text

VOCAB = Vocab.build(synthetic_text(), order="frequency")
EXPORT_DOCS = Path(__file__).resolve().parent.parent / "docs" / "commands" / "export.md"


CASES = [(core, layers, 0, format) for format in ("onnx", "torchscript") for core in ("scratch", "cudnn") for layers in (1, 2)]


@pytest.mark.parametrize(("core", "layers", "embedding", "format"), [*CASES, ("cudnn", 2, 8, "torchscript")])  # and one with an embedding
def test_exported_step_gives_lstmlms_logits_for_200_steps(tmp_path: Path, format: str, core: str, layers: int, embedding: int) -> None:
    net = lively_model(VOCAB, core, layers, embedding, seed=layers, scale=0.5)
    path = tmp_path / f"model.{format}"
    done = export_model(net, VOCAB, "raw", "the prime\n\n", "lively", path, format)
    assert done.path == path and path.stat().st_size == done.bytes and done.max_difference <= 1e-4
    ids = torch.randint(len(VOCAB), (3, 200), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, (H_T, C_T) = net(ids)  # (3, 200, vocab): lstmlm's forward over the whole sequence
    step = load_runtime(path, format)  # the file alone, in its runtime
    H = C = np.zeros((layers, 3, 24), np.float32)
    logits = []
    for t in range(200):
        out, H, C = step(ids[:, t].numpy(), H, C)
        logits.append(torch.from_numpy(out))
    assert_close(torch.stack(logits, dim=1), expected, 1e-5, f"{format} logits")
    assert_close(torch.from_numpy(H), H_T, 1e-5, "H")
    assert_close(torch.from_numpy(C), C_T, 1e-5, "C")
    meta = read_metadata(path, format)
    assert meta["tokens"] == VOCAB.tokens and meta["prime"] == "the prime\n\n" and (meta["layers"], meta["hiddens"]) == (layers, 24)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_onnx_exports_metadata_names_its_graphs_inputs_and_outputs(tmp_path: Path, cell: str) -> None:
    """A loop that asks the session for `meta["outputs"]` by name gets the logits and the next state."""
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    export_model(lively_model(VOCAB, cell=cell, scale=0.5), VOCAB, "raw", "", "lively", path, "onnx")
    meta = read_metadata(path, "onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert meta["inputs"] == [i.name for i in session.get_inputs()]
    assert meta["outputs"] == [o.name for o in session.get_outputs()]
    zero = np.zeros((1, 1, 24), np.float32)
    feeds = {"ids": np.array([1]), **dict.fromkeys(meta["inputs"][1:], zero)}
    assert len(session.run(meta["outputs"], feeds)) == len(meta["inputs"])


def greedy(step: object, meta: dict[str, object], prefix: str, length: int) -> str:
    """A loop that knows only the exported file: read the prime and the prefix, then argmax."""
    tokens = list(meta["tokens"])  # type: ignore[call-overload]
    index = {t: i for i, t in enumerate(tokens)}
    H = C = np.zeros((meta["layers"], 1, meta["hiddens"]), np.float32)  # type: ignore[misc]
    logits = None
    for c in str(meta["prime"]) + prefix:
        logits, H, C = step(np.array([index[c]]), H, C)  # type: ignore[operator]
    text = prefix
    for _ in range(length):
        i = int(np.argmax(logits[0]))  # type: ignore[index]
        text += tokens[i]
        logits, H, C = step(np.array([i]), H, C)  # type: ignore[operator]
    return text


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_a_greedy_loop_on_the_export_writes_what_lstmlm_generate_writes(tiny_runs: Path, tmp_path: Path, format: str) -> None:
    out = tmp_path / "raw.model"
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", format, "-o", out)
    assert result.code == 0, result.stderr
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \({format}, [\d,]+ bytes\); its logits match lstmlm's over 64 steps within \S+\n", result.stdout)
    meta = read_metadata(out, format)
    assert meta["prime"]  # the run has one: the loop must read it as generate does
    expected = cli("generate", "--run", "raw", "--runs-dir", tiny_runs, "--prefix", "the", "--length", "80").stdout
    assert greedy(load_runtime(out, format), meta, "the", 80) + "\n" == expected


def test_the_docs_onnxruntime_loop_runs_on_an_export(
    tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    block = EXPORT_DOCS.read_text(encoding="utf-8").split("<!-- the onnxruntime loop -->")[1].split("```python\n")[1].split("```")[0]
    assert len(block.strip().splitlines()) <= 14, "the docs promise a short loop"
    monkeypatch.chdir(tmp_path)
    assert cli("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", "model.onnx").code == 0
    exec(compile(block.replace('"ROMEO:"', '"the"').replace('"shakespeare.onnx"', '"model.onnx"'), "docs/commands/export.md", "exec"), {})
    printed = capsys.readouterr().out
    tokens = read_metadata(tmp_path / "model.onnx", "onnx")["tokens"]
    assert printed.startswith("the") and len(printed) >= len("the") + 200
    assert set(printed.removesuffix("\n")) <= set("".join(tokens))


def test_export_defaults_to_the_run_name_here(tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli("export", "--run", "d2l", "--runs-dir", tiny_runs, "--format", "torchscript").code == 0
    assert (tmp_path / "d2l.pt").is_file()
    assert read_metadata(tmp_path / "d2l.pt", "torchscript")["normalize"] == "d2l"


def test_an_unknown_format_is_one_line(tiny_runs: Path, tmp_path: Path) -> None:
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", "tflite", "-o", tmp_path / "x")
    assert_one_error_line(result, "--format must be onnx or torchscript, not 'tflite'")
    assert not (tmp_path / "x").exists()


def test_without_format_the_suffix_chooses_it(tiny_runs: Path, tmp_path: Path) -> None:
    """`-o model.pt` wrote ONNX, unsaid: a file torch.jit.load cannot read."""
    done = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", tmp_path / "model.pt")
    assert done.code == 0 and "(torchscript," in done.stdout
    assert read_metadata(tmp_path / "model.pt", "torchscript")["cell"] == "lstm"


def test_the_library_takes_the_output_as_a_string_too(tiny_runs: Path, tmp_path: Path) -> None:
    """export_run(..., "x.pt") was an AttributeError ('str' has no suffix); load takes a str runs directory."""
    from lstmlm.inference import export_run

    exported = export_run(tiny_runs, "raw", None, str(tmp_path / "x.pt"))  # type: ignore[arg-type]
    assert read_metadata(tmp_path / "x.pt", "torchscript")["cell"] == "lstm" and exported is not None


def test_a_suffix_naming_the_other_format_is_one_line(tiny_runs: Path, tmp_path: Path) -> None:
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", "torchscript", "-o", tmp_path / "x.onnx")
    assert_one_error_line(result, "x.onnx: its suffix .onnx is onnx's, not torchscript's: name it .pt, or leave --format out")
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_without_the_extra_is_a_one_line_hint(tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", tmp_path / "x.onnx")
    assert_one_error_line(result, "pip install 'lstmlm[export]'")
    assert not (tmp_path / "x.onnx").exists()


class InterruptedInit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """onnxruntime's import as Ctrl-C inside its extension module's initialisation leaves it:
    pybind11 turns the KeyboardInterrupt into ImportError("initialization failed") from it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "onnxruntime" else None

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e


def test_ctrl_c_inside_an_extras_import_is_an_interruption_not_a_missing_extra(tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was "error: exporting to ONNX needs onnx, onnxscript and onnxruntime: pip install
    'lstmlm[export]'", exit 1, to a user who has them and pressed Ctrl-C."""
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptedInit(), *sys.meta_path])
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", tmp_path / "x.onnx")
    assert_one_error_line(result, "interrupted", code=130)
    assert not (tmp_path / "x.onnx").exists()


def test_an_export_that_disagrees_with_lstmlm_is_not_kept(tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous export")
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # no difference is small enough now
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", "torchscript", "-o", target, "--force")
    assert_one_error_line(result, "the exported model's logits differ from lstmlm's", "nothing was written")
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_a_full_tmpdir_during_an_export_is_one_line_and_leaves_nothing(tiny_runs: Path, small_disk: Path, tmp_path: Path, format: str) -> None:
    """A real full filesystem as $TMPDIR, where the export is staged: torch's file writer threw
    from its destructor and the process aborted (exit 134), its staging directory left behind;
    the ONNX exporter's failure was a bare "error: No space left on device", naming no write."""
    if format == "onnx":
        pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install '.[export]')")
    fill(small_disk, leave=8192)  # room for the staging directory, not for the model
    before = sorted(p.name for p in small_disk.iterdir())
    out = tmp_path / ("model.onnx" if format == "onnx" else "model.pt")
    result = lstmlm_process("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", format, "-o", out, env={"TMPDIR": str(small_disk)})
    assert result.returncode == 1, result.stderr
    staged = rf"{re.escape(str(small_disk))}/lstmlm-export-\w+/model\.(pt|onnx)"
    assert re.fullmatch(rf"error: cannot write the exported model {staged}: No space left on device\n", result.stderr), result.stderr
    left = [p.name for p in small_disk.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own compile cache, made where $TMPDIR says
    assert sorted(left) == before  # the staging directory is gone
    assert not out.exists()


# ---- where an export may go: export -o, and the same rule for inspect --html and tune --output ------


def null_device(where: Path) -> Path:
    """A character device node like /dev/null (major 1, minor 3), made here: if a regression
    replaced it, the machine's own /dev/null would be spared. Needs root (mknod)."""
    node = where / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return node


def is_null_device(path: Path) -> bool:
    st = path.stat()
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_an_export_to_a_device_or_a_fifo_is_written_through_never_replaced(tiny_runs: Path, tmp_path: Path) -> None:
    """As root, `export -o /dev/null` renamed a regular file over /dev/null; a FIFO became a file."""
    null = null_device(tmp_path)
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", "torchscript", "-o", null)
    assert result.code == 0, result.stderr
    assert is_null_device(null) and sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no temporary beside it either
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    received = tmp_path / "received.onnx"
    reader = threading.Thread(target=lambda: received.write_bytes(fifo.read_bytes()), daemon=True)  # waits for the writer
    reader.start()
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", fifo)
    assert result.code == 0, result.stderr
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still a FIFO
    assert read_metadata(received, "onnx")["run"] == "raw"  # and what went through it is the export


def test_an_export_clears_what_a_killed_export_of_that_file_left_beside_it(tiny_runs: Path, tmp_path: Path) -> None:
    """kill -9 while an export was written left its temporary, as large as the export, in the
    user's folder, and every later export of that file left it there. The next write of the
    file clears it (writers into a folder take turns, so it is no live writer's); another
    file's temporary, perhaps being written now, is left alone."""
    killed = [tmp_path / ".model.pt.k1ll3d.tmp", tmp_path / ".model.pt.a9b8c7.tmp"]
    other = tmp_path / ".other.onnx.x1y2z3.tmp"
    for leftover in (*killed, other):
        leftover.write_bytes(b"half an export")
    result = cli("export", "--run", "raw", "--runs-dir", tiny_runs, "--format", "torchscript", "-o", tmp_path / "model.pt")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "model.pt"]


def test_an_existing_file_is_replaced_only_with_force_and_a_runs_file_never(tiny_runs: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs / "raw", runs / "raw")  # a run of its own: a regression must not damage the shared one
    export = ["export", "--run", "raw", "--runs-dir", runs, "--format", "torchscript"]
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"a file I care about")
    assert_one_error_line(cli(*export, "-o", mine), f"refusing to replace {mine}: it exists (--force replaces it)")
    assert mine.read_bytes() == b"a file I care about"
    assert cli(*export, "-o", mine, "--force").code == 0
    assert read_metadata(mine, "torchscript")["run"] == "raw"

    checkpoints = {name: (runs / "raw" / name).read_bytes() for name in ("latest.pt", "best.pt")}
    (tmp_path / "link.pt").symlink_to(runs / "raw" / "best.pt")
    for target in (runs / "raw" / "latest.pt", runs / "raw" / "model.pt", tmp_path / "link.pt"):
        result = cli(*export, "-o", target, "--force")
        assert_one_error_line(result, f"refusing to write {target}: {runs / 'raw'} is a run's directory, whose files are the run's own")
    assert {name: (runs / "raw" / name).read_bytes() for name in checkpoints} == checkpoints
    assert not (runs / "raw" / "model.pt").exists() and (tmp_path / "link.pt").is_symlink()
    assert_one_error_line(cli(*export, "-o", tmp_path), f"refusing to write {tmp_path}: it is a directory, not a file")


def test_inspect_html_follows_the_same_rule(tiny_runs: Path, tmp_path: Path) -> None:
    inspect = ["inspect", "--run", "raw", "--runs-dir", tiny_runs, "--text", "the time"]
    page = tmp_path / "page.html"
    page.write_text("my own page", encoding="utf-8")
    assert_one_error_line(cli(*inspect, "--html", page), f"refusing to replace {page}: it exists (--force replaces it)")
    assert page.read_text(encoding="utf-8") == "my own page"
    assert cli(*inspect, "--html", page, "--force").code == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    null = null_device(tmp_path)
    assert cli(*inspect, "--html", null).code == 0 and is_null_device(null)
    result = cli(*inspect, "--html", tiny_runs / "raw" / "page.html")
    assert_one_error_line(result, f"{tiny_runs / 'raw'} is a run's directory, whose files are the run's own")
