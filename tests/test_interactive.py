"""`lstmlm generate --interactive` in a real pseudo-terminal (the child's controlling terminal, so
Ctrl-C and Ctrl-D are the terminal's), and with piped input: each turn is `lstmlm generate`'s
text for the same options; --carry reads on from the last turn; Ctrl-C during a continuation
returns to the prompt, Ctrl-D or Ctrl-C at the prompt end the loop with exit code 0."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lstmlm.errors import VocabError
from lstmlm.generate import Sampling, generate
from lstmlm.inference import Conversation
from lstmlm.inference import load as load_trained

from support.cli import cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pseudo-terminals")

ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")  # a terminal control sequence (readline may send some)
PROMPT = b"> "
SAMPLING = ["--length", "60", "--temperature", "0.8", "--seed", "3"]


class Terminal:
    """`python -m lstmlm ARGS` on a new pseudo-terminal; what it writes, as the terminal shows it."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "TERM": "dumb", "LSTMLM_DEBUG": "0"}
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal and stdin, stdout, stderr
            os.execve(sys.executable, [sys.executable, "-m", "lstmlm", *args], env)
        self.pid, self.fd = pid, fd
        self.seen = b""  # everything read so far, escape sequences removed
        self.mark = 0  # where the last read_until's match ended
        self.code: int | None = None

    def read_until(self, pattern: bytes, timeout: float = 60.0) -> str:
        """The output after the last match up to and including `pattern`, with the terminal's
        \\r\\n as \\n."""
        deadline = time.monotonic() + timeout
        while (at := self.seen.find(pattern, self.mark)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout} s; the terminal shows …{self.seen[self.mark :][-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"the program ended before {pattern!r}; it showed {self.seen[self.mark :]!r}"
                self.seen = ESCAPE.sub(b"", self.seen + chunk)
        text = self.seen[self.mark : at + len(pattern)]
        self.mark = at + len(pattern)
        return text.decode().replace("\r\n", "\n")

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait_for_a_key(self, timeout: float = 30.0) -> None:
        """Until the program sleeps in select or poll, waiting for a key, as a person at the
        prompt finds it: CPython's readline misses a SIGINT that lands after it printed the
        prompt and before it began to wait (the test would hang where no person could)."""
        stat, wchan = Path(f"/proc/{self.pid}/stat"), Path(f"/proc/{self.pid}/wchan")
        if not wchan.exists():  # no /proc (not Linux): type at once
            return
        deadline = time.monotonic() + timeout
        while not (stat.read_text().rsplit(")", 1)[1].split()[0] == "S" and ("poll" in wchan.read_text() or "select" in wchan.read_text())):
            assert time.monotonic() < deadline, f"not waiting for a key after {timeout} s: …{self.seen[self.mark :][-500:]!r}"
            time.sleep(0.01)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the program has ended; the rest of its output is read."""
        deadline = time.monotonic() + timeout
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                break
            assert time.monotonic() < deadline, f"still running after {timeout} s: …{self.seen[self.mark :][-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:
                    pass
        return self.code

    def close(self) -> None:
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[type[Terminal]]:
    started: list[Terminal] = []

    def start(args: list[str]) -> Terminal:
        t = Terminal(args)
        started.append(t)
        return t

    yield start  # type: ignore[misc]
    for t in started:
        t.close()


def generate_text(runs: Path, prefix: str, *options: str) -> str:
    """What `lstmlm generate` prints for `prefix` (without its final line break)."""
    result = cli("generate", "--run", "raw", "--runs-dir", runs, "--prefix", prefix, *options)
    assert result.code == 0, result.stderr
    return result.stdout.removesuffix("\n")


def turn(term: Terminal, prefix: str) -> str:
    """Type a prefix at the prompt; the text the program answers with (its echo left out)."""
    term.type(prefix.encode() + b"\n")
    term.read_until(prefix.encode() + b"\r\n")  # the terminal's echo of the line typed
    return term.read_until(b"\n" + PROMPT).removesuffix("\n" + PROMPT.decode())


def test_each_turn_is_what_generate_prints_and_ctrl_d_ends_the_loop(tiny_runs: Path, terminal: type[Terminal]) -> None:
    term = terminal(["generate", "--interactive", "--run", "raw", "--runs-dir", str(tiny_runs), *SAMPLING])
    assert term.read_until(PROMPT) == PROMPT.decode()
    for prefix in ("the", "time traveller", "the"):
        assert turn(term, prefix) == generate_text(tiny_runs, prefix, *SAMPLING)
    term.type(b"\x04")  # Ctrl-D at the start of a line: end of input
    assert term.wait() == 0
    assert b"Traceback" not in term.seen and b"error" not in term.seen


def test_carry_reads_on_from_where_the_last_turn_ended(tiny_runs: Path, terminal: type[Terminal]) -> None:
    """With --carry a turn continues the transcript: it is what `generate` makes for the whole
    transcript as its prefix; an empty line continues without a prefix."""
    options = ["--length", "40"]  # greedy
    term = terminal(["generate", "--interactive", "--carry", "--run", "raw", "--runs-dir", str(tiny_runs), *options])
    term.read_until(PROMPT)
    transcript = ""
    for prefix in ("the", "", "was", ""):
        answer = turn(term, prefix)
        assert answer.startswith(prefix)
        expected = generate_text(tiny_runs, transcript + prefix, *options)
        assert transcript + answer == expected
        transcript = expected
    fresh = generate_text(tiny_runs, "was", *options)
    assert transcript[-len(fresh) :] != fresh  # what came before changed the continuation: the state was carried
    term.type(b"\x04")
    assert term.wait() == 0


def test_carry_with_sampling_reads_back_every_token_the_model_wrote(tiny_runs: Path, terminal: type[Terminal]) -> None:
    """Sampled, with a seed that moves on by one a turn: each turn is the library's generation
    after every token so far, a "<unk>" the model wrote read back as the one token it was."""
    trained = load_trained(tiny_runs, "raw")
    term = terminal(["generate", "-i", "--carry", "--run", "raw", "--runs-dir", str(tiny_runs), "--length", "80", "--temperature", "1.3", "--seed", "5"])
    term.read_until(PROMPT)
    context, written = list(trained.prime), []
    for k, prefix in enumerate(("the", "", "was", "", "")):
        expected = generate(trained.model, trained.vocab, prefix, Sampling(length=80, temperature=1.3, seed=5 + k), context)
        text = prefix + "".join(chars[0] for chars in expected)
        assert turn(term, prefix) == text
        context += [*prefix, *expected.tokens[0]]
        written += expected.tokens[0]
    assert "<unk>" in written  # the tiny model does write it at this temperature: the test has teeth
    term.type(b"\x04")
    assert term.wait() == 0


def test_ctrl_c_ends_a_continuation_then_ctrl_c_at_the_prompt_ends_the_loop(tiny_runs: Path, terminal: type[Terminal]) -> None:
    term = terminal(["generate", "--interactive", "--run", "raw", "--runs-dir", str(tiny_runs), "--length", "100000000", "--temperature", "1"])
    term.read_until(PROMPT)
    for _ in range(2):  # a second turn works after the first was cut short
        term.type(b"the\n")
        term.read_until(b"the\r\nthe")  # the echo, then the continuation starts
        term.read_until(b" ")  # it is streaming
        term.type(b"\x03")  # Ctrl-C: the terminal sends SIGINT
        term.read_until(b"\n" + PROMPT)  # back at the prompt, long before 10^8 characters
    term.wait_for_a_key()
    term.type(b"\x03")  # Ctrl-C at the prompt
    assert term.wait() == 0
    assert b"Traceback" not in term.seen and b"error" not in term.seen


def test_the_librarys_continuation_runs_in_the_precision_load_was_given(tiny_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """continue_prefix took fp32 unless told again: a model loaded for bf16 generated in fp32."""
    import lstmlm.inference as inference

    asked: list[str] = []
    real = inference.generate
    monkeypatch.setattr(inference, "generate", lambda *args: asked.append(args[-1]) or real(*args))
    trained = load_trained(tiny_runs, "raw", precision="bf16")
    text = "".join(step[0] for step in inference.continue_prefix(trained, "the", Sampling(length=5)).steps)
    assert asked == ["bf16"] and len(text) == 5
    inference.continue_prefix(trained, "the", Sampling(length=5), precision="fp32")
    assert asked == ["bf16", "fp32"]  # and one asked for still chooses


def test_piped_lines_are_turns_and_a_bad_prefix_is_one_error_line(tiny_runs: Path) -> None:
    """Without a terminal there is no prompt: each line read is a turn, and a prefix the model
    cannot read is one error line on stderr while the loop goes on."""
    done = subprocess.run(
        [sys.executable, "-m", "lstmlm", "generate", "--interactive", "--run", "raw", "--runs-dir", str(tiny_runs), *SAMPLING],
        input="the\nTHE!\ntime\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == generate_text(tiny_runs, "the", *SAMPLING) + "\n" + generate_text(tiny_runs, "time", *SAMPLING) + "\n"
    assert done.stderr.splitlines() == ["error: prefix characters outside the model's vocabulary: '!' 'E' 'H' 'T'"]


def test_carry_reads_only_what_came_since_the_last_turn(tiny_runs: Path) -> None:
    """Issue 27, finding 21: --carry carries the state; a turn reads the last turn's text and its
    own prefix, never the whole history again, and gives what reading the history gives."""
    trained = load_trained(tiny_runs, "raw")
    conversation = Conversation(trained, Sampling(length=30), carry=True)
    lengths: list[int] = []
    forward = trained.model.forward

    def counted(X: Any, *args: Any, **kwargs: Any) -> Any:
        lengths.append(X.shape[1])
        return forward(X, *args, **kwargs)

    trained.model.forward = counted  # type: ignore[method-assign]
    transcript = ""
    for k in range(12):
        prefix = "the" if k % 2 == 0 else ""
        lengths.clear()
        generation = conversation.turn(prefix)
        text = prefix + "".join(chars[0] for chars in generation.steps)
        assert sum(lengths) <= 30 + len(prefix) + (len(trained.prime) if k == 0 else 0)  # this turn's new tokens
        trained.model.forward = forward  # type: ignore[method-assign]
        whole = generate(trained.model, trained.vocab, "", Sampling(length=30), [*trained.prime, *transcript, *prefix])
        assert text == prefix + "".join(chars[0] for chars in whole)  # what reading the whole history gives
        trained.model.forward = counted  # type: ignore[method-assign]
        transcript += text


def test_a_stop_string_the_model_never_writes_is_refused_before_the_first_turn(tiny_runs: Path) -> None:
    trained = load_trained(tiny_runs, "d2l")
    with pytest.raises(VocabError, match=re.escape("the stop string 'A\\n' can never appear: the model never writes '\\n'")):
        Conversation(trained, Sampling(length=5, stop=("A\n",)))
    assert Conversation(trained, Sampling(length=5, stop=("A",))).sampling.stop == ("A",)  # read as 'a' at each turn
