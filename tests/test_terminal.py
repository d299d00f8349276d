"""What reaches a terminal: a model's text, a corpus's characters and names a user gave never
act on it (checked on a real pseudo-terminal) and are never read as Rich markup; piped, the
text is written as it is. A reader that closes the pipe early ends a command quietly; --json
is strict JSON.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lstmlm.cli.console import print_json, visible
from lstmlm.errors import ConfigError
from lstmlm.generate import Sampling

from support.cli import assert_one_error_line, cli
from support.loopback import LoopbackServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pseudo-terminals")

# Clear the screen, set the window title, write the clipboard (OSC 52), ring the bell: a model
# trained on this text makes these sequences, and a terminal would act on them.
HOSTILE_LINE = "ab\x1b[2J\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07cd\n"
TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """runs/hostile: a raw-text model that has learned HOSTILE_LINE by heart; the env to run it in."""
    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "hostile.txt"
    corpus.write_text(HOSTILE_LINE * 200, encoding="utf-8")
    env = {**os.environ, "LSTMLM_HOME": str(root / "home"), "OMP_NUM_THREADS": "1", "LSTMLM_DEBUG": "0", "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", env["LSTMLM_HOME"])
        trained = cli(
            "train", "--corpus", corpus, "--normalize", "raw", "--runs-dir", root / "runs", "--run", "hostile", "--hidden", "32",
            "--batch-size", "8", "--num-steps", "20", "--epochs", "6", "--optimizer", "adam", "--lr", "0.02", "--device", "cpu",
        )  # fmt: skip
        assert trained.code == 0, trained.stderr
    yield root, env


def lstmlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "lstmlm", *map(str, args)]


def in_terminal(command: list[str], env: dict[str, str]) -> bytes:
    """Everything `command` writes to a pseudo-terminal (stdout and stderr both), as a terminal gets it."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    received = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the other end is closed
                break
            if not data:
                break
            received.append(data)
        else:
            proc.kill()
            pytest.fail("the command did not finish")
        assert proc.wait(timeout=TIMEOUT_S) == 0, b"".join(received).decode(errors="replace")[-2000:]
    finally:
        os.close(master)
    return b"".join(received)


GENERATE = ("generate", "--run", "hostile", "--prefix", "ab", "--length", "120")


def test_generated_control_characters_are_shown_on_a_terminal_and_written_as_they_are_into_a_pipe(hostile: tuple[Path, dict[str, str]]) -> None:
    root, env = hostile
    command = lstmlm(*GENERATE, "--runs-dir", root / "runs")
    piped = subprocess.run(command, capture_output=True, env=env, timeout=TIMEOUT_S)
    assert piped.returncode == 0, piped.stderr
    assert b"\x1b]52;c;cHduZWQ=\x07" in piped.stdout and b"\x1b[2J" in piped.stdout  # the model makes them

    shown = in_terminal(command, env)
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert "␛]52;c;cHduZWQ=␇" in shown.decode() and "␛[2J" in shown.decode()

    raw = in_terminal([*command, "--raw-output"], env)
    assert b"\x1b]52;c;cHduZWQ=\x07" in raw


def test_several_samples_on_a_terminal_show_their_control_characters(hostile: tuple[Path, dict[str, str]]) -> None:
    root, env = hostile
    shown = in_terminal(lstmlm(*GENERATE, "--num-samples", "2", "--temperature", "0.5", "--seed", "1", "--runs-dir", root / "runs"), env)
    assert b"\x1b]" not in shown and b"\x1b[2J" not in shown and b"\x07" not in shown
    assert "␛]52;" in shown.decode()


def test_training_samples_never_reach_a_terminal_raw(hostile: tuple[Path, dict[str, str]]) -> None:
    """Samples as training goes and at the end; Rich's own colours and bars use CSI sequences,
    but none of these."""
    root, env = hostile
    command = lstmlm(
        "train", "--corpus", root / "hostile.txt", "--normalize", "raw", "--runs-dir", root / "runs", "--run", "samples",
        "--hidden", "16", "--batch-size", "8", "--num-steps", "20", "--epochs", "2", "--sample-every", "1", "--device", "cpu",
    )  # fmt: skip
    shown = in_terminal(command, env)
    for sequence in (b"\x1b[2J", b"\x1b]0;", b"\x1b]52;", b"\x07"):
        assert sequence not in shown, sequence
    assert "␛]0;pwned␇" in shown.decode()


def test_inspect_shows_the_texts_control_characters(hostile: tuple[Path, dict[str, str]]) -> None:
    root, env = hostile
    shown = in_terminal(lstmlm("inspect", "--run", "hostile", "--runs-dir", root / "runs", "--text", HOSTILE_LINE * 2), env)
    for sequence in (b"\x1b[2J", b"\x1b]0;", b"\x1b]52;", b"\x07"):
        assert sequence not in shown, sequence
    assert "␛" in shown.decode()


def test_visible_pictures_every_control_character_but_newline_and_tab() -> None:
    assert visible("a\x1b[2Jb\rc\x07d\x7fe\x9bf\n\tg\x00") == "a␛[2Jb␍c␇d␡e\\x9bf\n\tg␀"
    assert visible("plain text, “quotes”, 時間") == "plain text, “quotes”, 時間"


def test_an_error_naming_hostile_text_is_one_visible_line(tmp_path: Path) -> None:
    name = tmp_path / "a\x1b]0;pwned\x07\nb.txt"
    result = cli("train", "--corpus", name, "--runs-dir", tmp_path / "runs")
    assert_one_error_line(result, "corpus not found", "␛]0;pwned␇␊b.txt")


# ---- markup --------------------------------------------------------------------------------------


def test_a_downloaded_files_name_is_never_read_as_markup(http_server: LoopbackServer, serve_dir: Path, tmp_path: Path) -> None:
    """The progress bar's text is Rich markup: the name goes in escaped, so "[red]" shows as itself."""
    (serve_dir / "[red]corpus.txt").write_bytes(b"the time traveller\n" * 200_000)
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    shown = in_terminal(lstmlm("download", http_server.url("[red]corpus.txt"), "--dir", tmp_path / "cache"), env).decode()
    assert "downloading [red]corpus-" in shown


def test_a_corpus_path_and_run_name_that_look_like_markup_train_and_show_as_themselves(
    corpus_file: Path, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[/x]` in a corpus path was a MarkupError once the run directory existed; `[red]` in a run
    name turned the table red. Both are config values and names: shown as typed."""
    monkeypatch.chdir(tmp_path)  # a short relative path: the table shows it on one line
    corpus = Path("a[/x]/c[bold].txt")  # directories "a[" and "x]"
    corpus.parent.mkdir(parents=True)
    corpus.write_bytes(corpus_file.read_bytes())
    args = ["--normalize", "raw", "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4", "--num-steps", "5", "--epochs", "1"]
    result = cli("train", "--corpus", corpus, "--run", "m[red]x", *args)
    assert result.code == 0, result.stderr
    assert "run m[red]x" in result.stdout and " a[/x]/c[bold].txt " in result.stdout
    assert (runs_dir / "m[red]x" / "latest.pt").is_file()


# ---- pipes and JSON ------------------------------------------------------------------------------


def test_generate_into_a_pipe_closed_early_ends_quietly(hostile: tuple[Path, dict[str, str]]) -> None:
    """`lstmlm generate | head -c 10`: no "error: Broken pipe", and 141 as a program killed by
    SIGPIPE exits."""
    root, env = hostile
    proc = subprocess.Popen(lstmlm(*GENERATE[:-1], "100000", "--runs-dir", root / "runs"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=TIMEOUT_S) == 141
    assert proc.stderr.read() == b""


def test_a_seed_out_of_range_is_refused_before_anything_is_printed(hostile: tuple[Path, dict[str, str]]) -> None:
    root, _ = hostile
    result = cli(*GENERATE, "--runs-dir", root / "runs", "--temperature", "1", "--seed", "99999999999999999999999")
    assert result.code == 2 and result.stdout == "" and "--seed" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match=r"--seed must be from 0 to 2\*\*64 - 1, not 18446744073709551616"):
        Sampling(seed=2**64)


def test_json_lines_are_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    print_json({"perplexity": float("nan"), "val": float("inf"), "nested": {"x": [float("-inf"), 1.5]}, "run": "r"})
    line = stdout.getvalue()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"perplexity": None, "val": None, "nested": {"x": [None, 1.5]}, "run": "r"}
