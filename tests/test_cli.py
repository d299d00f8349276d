"""The command line (in-process, CliRunner): --json, --resume, generate, and the bad-input matrix.

Every failure is one line on stderr starting "error: ", exit code 1 (2 for usage errors that
Typer reports), never a traceback, and nothing already on disk changes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lstmlm.checkpoint as checkpoint_mod
from lstmlm.checkpoint import load_checkpoint
from lstmlm.cli.errors import one_line
from lstmlm.config import Config
from lstmlm.data.pipeline import prepare_data
from lstmlm.device import available_memory
from lstmlm.generate import complete
from lstmlm.model import CharLM, convert, num_parameters, training_bytes
from lstmlm.runs import RunStore
from lstmlm.vocab import Vocab

from support.cli import Result, assert_no_torch, assert_one_error_line, cli
from support.faults import Payload
from support.loopback import LoopbackServer
from support.references import predict_ch8
from support.tiny import synthetic_text

TINY = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]


def assert_usage_error(result: Result, *fragments: str) -> None:
    assert result.code == 2
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


# ---- trained runs, shared by the module (generation never writes) ---------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """runs/d2l (d2l text, scratch) and runs/raw (raw text, cudnn), 3 epochs each."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        common = ["train", "--corpus", corpus, "--runs-dir", root / "runs", *TINY, "--epochs", "3", "--optimizer", "adam", "--lr", "0.02"]
        assert cli(*common, "--normalize", "d2l", "--run", "d2l", "--model", "scratch").code == 0
        assert cli(*common, "--normalize", "raw", "--run", "raw", "--model", "cudnn").code == 0
        yield root / "runs"


@pytest.fixture
def runs_copy(trained: Path, runs_dir: Path) -> Path:
    """A private copy of the trained runs, for tests that may write."""
    shutil.copytree(trained, runs_dir)
    return runs_dir


def checkpoint_model(run: Path, core: str | None = None) -> tuple[CharLM, Vocab]:
    payload = load_checkpoint(run / "latest.pt")
    cfg = Config().with_overrides(json.loads(payload["config"])["model"])
    vocab = Vocab.from_json(payload["vocab"])
    net = CharLM.from_config(cfg.model, len(vocab))
    net.load_state_dict(convert(payload["model"], core or cfg.model.model, net.cell))
    return net.eval(), vocab


# ---- train: --json, --resume ----------------------------------------------------------------------

EPOCH_FIELDS = {"event", "epoch", "train_perplexity", "val_perplexity", "tokens_per_s", "seconds"}
DONE_FIELDS = {"event", "perplexity", "tokens_per_s", "device", "model", "run", "epochs", "vocab_size", "samples"}


def test_json_lines_parse_and_carry_the_fields(tiny_train_args: list[str], runs_dir: Path) -> None:
    result = cli(*tiny_train_args, "--normalize", "d2l", "--epochs", "3", "--run", "j", "--json")
    assert result.code == 0, result.stderr
    records = result.json()  # every stdout line is JSON
    assert result.stderr == ""  # and nothing else is printed
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for r in epochs:
        assert EPOCH_FIELDS <= r.keys()
        assert r["val_perplexity"] is None  # d2l mode: no validation split, as the seed
        assert r["train_perplexity"] > 1 and r["tokens_per_s"] > 0 and r["seconds"] > 0
    done = records[-1]
    assert done["event"] == "done" and DONE_FIELDS <= done.keys()
    assert done["perplexity"] == epochs[-1]["train_perplexity"]
    assert (done["device"], done["model"], done["run"], done["epochs"]) == ("cpu", "scratch", "j", 3)
    assert done["vocab_size"] == 1 + len(set(synthetic_text().replace("\n", "")))
    assert set(done["samples"]) == {"time traveller", "traveller"}  # d2l's text: d2l's prefixes
    assert all(text.startswith(prefix) and len(text) == len(prefix) + 50 for prefix, text in done["samples"].items())
    assert [r["epoch"] for r in map(json.loads, (runs_dir / "j" / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_json_with_validation_reports_it(tiny_train_args: list[str]) -> None:
    records = cli(*tiny_train_args, "--val-fraction", "0.2", "--json").json()
    assert all(r["val_perplexity"] > 1 for r in records if r["event"] == "epoch")
    assert records[-1]["val_perplexity"] > 1


def test_json_carries_the_notes_the_terminal_shows(tiny_train_args: list[str]) -> None:
    """The precision chosen is a line on the terminal; with --json it is a "note" line on stdout
    (it was left out: --json said nothing of the precision, nor of the default recipe's choice)."""
    shown = cli(*tiny_train_args, "--run", "terminal")
    assert shown.code == 0, shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if line.startswith("precision ")]
    result = cli(*tiny_train_args, "--run", "json", "--json")
    assert result.code == 0 and result.stderr == ""
    assert {"event": "note", "message": line} in result.json()


def test_human_output_ends_with_the_seed_line_and_samples(tiny_train_args: list[str]) -> None:
    result = cli(*tiny_train_args, "--normalize", "d2l")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[-3].startswith("perplexity ") and lines[-3].endswith(" tokens/sec on cpu")
    assert lines[-2].startswith("time traveller") and lines[-1].startswith("traveller")


def test_a_sample_as_training_goes_is_one_line_however_wide_its_characters(tmp_path: Path, runs_dir: Path) -> None:
    """A sample of Chinese (two columns a character) was wrapped at the console's width, as if
    the model had written a newline, and moved whole below its 'epoch 1'."""
    corpus = tmp_path / "zh.txt"
    corpus.write_text("時間旅行者が語った未来の話を聞いた" * 200, encoding="utf-8")  # no newline anywhere
    args = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--epochs", "2", "--sample-every", "1e", "--device", "cpu"]
    result = cli("train", "--corpus", corpus, "--runs-dir", runs_dir, *args)
    assert result.code == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("epoch 1")]
    assert len(line) > len("epoch 1 ") + 40


def test_the_start_table_shows_what_this_run_chose_and_verbose_shows_all(tiny_train_args: list[str]) -> None:
    """The options given (and the run's identity) in the table; the defaults, sentinels among them,
    only with --verbose; the table says where the rest is."""
    plain = cli(*tiny_train_args, "--run", "plain")
    assert plain.code == 0, plain.stderr
    table = plain.stdout.split("perplexity")[0]
    for chosen in ("hidden", "batch_size", "num_steps", "epochs", "corpus", "model", "cell"):
        assert f" {chosen} " in table, chosen
    assert " dropout_input " not in table and " weight_decay " not in table
    flat = "".join(table.split())  # the caption wraps at the terminal's width
    assert "settings:" in flat and "/runs/plain/config.json,or--verbose" in flat
    verbose = cli(*tiny_train_args, "--run", "verbose", "--verbose")
    assert " dropout_input " in verbose.stdout and " weight_decay " in verbose.stdout and "--verbose" not in verbose.stdout


def test_resume_continues_from_the_stored_epoch(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r", "--json").code == 0
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "4", "--json")
    assert result.code == 0, result.stderr
    records = result.json()
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [3, 4]
    assert records[-1]["epochs"] == 4
    stored = [json.loads(line)["epoch"] for line in (runs_dir / "r" / "metrics.jsonl").read_text().splitlines()]
    assert stored == [1, 2, 3, 4]
    assert load_checkpoint(runs_dir / "r" / "latest.pt")["trainer"]["state"]["epoch"] == 4


def test_resume_without_run_takes_the_latest(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "old").code == 0
    assert cli(*tiny_train_args, "--run", "new").code == 0
    records = cli("train", "--resume", "--runs-dir", runs_dir, "--epochs", "3", "--json").json()
    assert records[-1]["run"] == "new" and records[-1]["epochs"] == 3


def test_resume_through_the_cli_is_bitwise_exact(tiny_train_args: list[str], runs_dir: Path) -> None:
    options = [*tiny_train_args, "--layers", "2", "--dropout", "0.3", "--iterator", "random"]
    assert cli(*options, "--epochs", "4", "--run", "straight").code == 0
    assert cli(*options, "--epochs", "2", "--run", "split").code == 0
    assert cli("train", "--resume", "--run", "split", "--runs-dir", runs_dir, "--epochs", "4").code == 0
    a, b = (load_checkpoint(runs_dir / r / "latest.pt") for r in ("straight", "split"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    losses = lambda r: [json.loads(x)["train_loss"] for x in (runs_dir / r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("straight") == losses("split")


def test_resume_refuses_to_change_the_model(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    before = snapshot(runs_dir)
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--hidden", "32")
    assert_one_error_line(result, "--resume keeps the run's stored hidden = 16; it cannot change to 32")
    assert snapshot(runs_dir) == before


def test_resume_takes_the_command_that_started_the_run_config_and_all(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    """The habit: the command that started the run, plus --resume. Its --config agrees with the
    stored config, so it is accepted; what the file sets that a resume may change (epochs) applies."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[model]\nlayers = 2\n[train]\nepochs = 1\n", encoding="utf-8")
    assert tiny_train_args[-4:-2] == ["--epochs", "2"]
    started = [*tiny_train_args[:-4], *tiny_train_args[-2:], "--run", "r", "--config", str(recipe)]  # the epochs from the file
    assert cli(*started).code == 0
    recipe.write_text("[model]\nlayers = 2\n[train]\nepochs = 2\n", encoding="utf-8")
    resumed = cli(*started, "--resume", "--json")
    assert resumed.code == 0, resumed.stderr
    assert [e["epoch"] for e in resumed.json() if e["event"] == "epoch"] == [2]


def test_resume_takes_the_command_that_started_the_run_with_its_auto_values(tiny_train_args: list[str], runs_dir: Path) -> None:
    """A run keeps 'auto' and -1 resolved for its corpus (normalize raw, max_tokens 0,
    val_fraction 0.1): the command that started it, plus --resume, was refused as a change."""
    started = [*(a if a != "raw" else "auto" for a in tiny_train_args), "--max-tokens", "-1", "--val-fraction", "-1", "--run", "r"]
    assert cli(*started).code == 0
    resumed = cli(*[a if a != "2" else "3" for a in started], "--resume", "--json")
    assert resumed.code == 0, resumed.stderr
    assert [e["epoch"] for e in resumed.json() if e["event"] == "epoch"] == [3]
    # a split beside the run's val_fraction is no config at all: still the resume's line
    for option, value, line in (("--normalize", "d2l", "normalize = 'raw'"), ("--split", "0.9,0.1", "split = ''")):
        refused = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "4", option, value)
        assert_one_error_line(refused, f"--resume keeps the run's stored {line}; it cannot change to {value!r}")


def test_resume_names_the_keys_a_config_file_disagrees_on(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    other = tmp_path / "other.toml"
    other.write_text("[model]\nhidden = 64\n", encoding="utf-8")
    result = cli(*tiny_train_args, "--run", "r", "--resume", "--config", other, "--epochs", "3")  # hidden 64 in the file, 16 in the options: these win
    assert result.code == 0, result.stderr
    before = snapshot(runs_dir)
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--config", other)  # the file alone: its hidden, defaults' batches
    assert_one_error_line(
        result, f"--resume keeps the run's stored config, and {other} (with the options given) differs from it in",
        "batch_size (the run's 8, here 32)", "num_steps (the run's 10, here 35)", "hidden (the run's 16, here 64)", "start a new --run",
    )  # fmt: skip
    assert snapshot(runs_dir)["r/config.json"] == before["r/config.json"]


@pytest.mark.parametrize("change", ["edited", "replaced"])
def test_resume_refuses_a_corpus_that_changed(tiny_train_args: list[str], runs_dir: Path, corpus_file: Path, change: str) -> None:
    """The run keeps its corpus's content hash: an edited file, or another moved into its place,
    would silently train the run on different text."""
    assert cli(*tiny_train_args, "--run", "r").code == 0
    then = hashlib.sha1(corpus_file.read_bytes()).hexdigest()
    if change == "edited":
        corpus_file.write_text(corpus_file.read_text(encoding="utf-8") + "a new last line\n", encoding="utf-8")
    else:
        corpus_file.unlink()
        corpus_file.write_text(synthetic_text(seed=99), encoding="utf-8")
    now = hashlib.sha1(corpus_file.read_bytes()).hexdigest()
    before = snapshot(runs_dir)
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3")
    assert_one_error_line(result, f"the corpus {corpus_file} has changed since run r was created (SHA-1 {then} then, {now} now)")
    assert snapshot(runs_dir) == before


def test_resume_saves_the_options_a_resume_may_change(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    assert cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3", "--patience", "4").code == 0
    stored = json.loads((runs_dir / "r" / "config.json").read_text())["train"]
    assert (stored["epochs"], stored["patience"]) == (3, 4)
    records = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "4", "--json").json()
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [4]


def test_a_resume_with_no_epoch_left_to_train_is_refused_leaving_the_run_as_it_was(tiny_train_args: list[str], runs_dir: Path) -> None:
    """It saved the --epochs given, trained nothing and reported the run again ('epoch 3/2'), exit 0."""
    assert cli(*tiny_train_args, "--run", "r").code == 0
    before = {f.name: f.read_bytes() for f in (runs_dir / "r").iterdir() if f.is_file()}
    resume = ("train", "--resume", "--run", "r", "--runs-dir", runs_dir)
    assert_one_error_line(cli(*resume, "--epochs", "1"), "run r has trained 2 epochs already, so --epochs 1 leaves nothing to train: give --epochs above 2")
    assert_one_error_line(cli(*resume), "run r has trained all its 2 epochs: resume it with --epochs above 2 to train on")
    assert {f.name: f.read_bytes() for f in (runs_dir / "r").iterdir() if f.is_file()} == before


def test_same_seed_same_samples(tiny_train_args: list[str]) -> None:
    a, b = (cli(*tiny_train_args, "--normalize", "d2l", "--json", "--seed", "5").json()[-1] for _ in range(2))
    assert a["samples"] == b["samples"] and a["perplexity"] == b["perplexity"]


# ---- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["d2l", "raw"])
def test_generate_greedy_equals_d2l_predict_on_the_checkpoint(trained: Path, run: str) -> None:
    result = cli("generate", "--run", run, "--runs-dir", trained, "--prefix", "time traveller", "--length", "60")
    assert result.code == 0, result.stderr
    net, vocab = checkpoint_model(trained / run)
    with torch.no_grad():
        assert result.stdout == predict_ch8("time traveller", 60, net, vocab) + "\n"


@pytest.mark.parametrize(("run", "other"), [("d2l", "cudnn"), ("raw", "scratch")])
def test_generate_on_the_other_core_gives_the_same_text(trained: Path, run: str, other: str) -> None:
    args = ["generate", "--run", run, "--runs-dir", trained, "--length", "60"]
    same = cli(*args)
    converted = cli(*args, "--model", other)
    assert same.code == converted.code == 0
    assert converted.stdout == same.stdout
    sampled = ["--temperature", "0.9", "--top-k", "5", "--seed", "3"]
    assert cli(*args, *sampled, "--model", other).stdout == cli(*args, *sampled).stdout


def test_generate_reads_the_runs_prime_unless_told_not_to(runs_copy: Path) -> None:
    """A raw run's checkpoint carries the end of its training text; generate reads it before
    the prefix, and --no-prime starts from the zero state as the training model would."""
    net, vocab = checkpoint_model(runs_copy / "raw")
    payload = load_checkpoint(runs_copy / "raw" / "latest.pt")
    prime = "the time\n\n"  # the fixture's text has no paragraph break: give the run one
    payload["prime"] = prime
    torch.save(payload, runs_copy / "raw" / "latest.pt")
    args = ["generate", "--run", "raw", "--runs-dir", runs_copy, "--prefix", "time", "--length", "40"]
    assert cli(*args).stdout == complete(net, vocab, "time", 40, prime=prime) + "\n"
    assert cli(*args, "--no-prime").stdout == complete(net, vocab, "time", 40) + "\n"


def test_generate_same_seed_same_text(trained: Path) -> None:
    args = ["generate", "--run", "d2l", "--runs-dir", trained, "--length", "80", "--temperature", "1"]
    first = cli(*args, "--seed", "11").stdout
    assert cli(*args, "--seed", "11").stdout == first
    assert cli(*args, "--seed", "12").stdout != first
    several = cli(*args, "--seed", "11", "--num-samples", "3")
    assert several.code == 0 and several.stdout.count("--- sample") == 3


def test_generate_defaults_to_the_latest_run(trained: Path) -> None:
    result = cli("generate", "--runs-dir", trained, "--length", "10")
    assert result.code == 0 and result.stdout.startswith("time traveller")


def test_d2l_prefix_is_normalized_and_the_command_says_so(trained: Path) -> None:
    result = cli("generate", "--run", "d2l", "--runs-dir", trained, "--prefix", "Time Traveller!", "--length", "20")
    assert result.code == 0
    assert result.stdout.startswith("time traveller") and len(result.stdout) == len("time traveller") + 21
    assert "normalized" in result.stderr and "'time traveller'" in result.stderr
    plain = cli("generate", "--run", "d2l", "--runs-dir", trained, "--prefix", "time traveller", "--length", "20")
    assert plain.stdout == result.stdout and plain.stderr == ""


def test_raw_prefix_outside_the_vocabulary_is_one_line_listing_the_characters(trained: Path) -> None:
    result = cli("generate", "--run", "raw", "--runs-dir", trained, "--prefix", "Time Traveller!")
    assert_one_error_line(result, "prefix characters outside the model's vocabulary: '!' 'T'")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--run", "nope"), "no run at"),
        (("--model", "lstm"), "--model must be scratch or cudnn, not 'lstm'"),
        (("--device", "tpu"), "unknown device 'tpu'"),
        (("--device", "cuda"), "--device cuda: no CUDA GPU is available here"),
        (("--precision", "fp8"), "unknown precision 'fp8'"),
    ],
)
def test_generate_errors_are_one_line(trained: Path, args: tuple[str, ...], fragment: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_error_line(cli("generate", "--run", "d2l", "--runs-dir", trained, *args), fragment)


def test_generate_without_any_run_is_one_line(runs_dir: Path) -> None:
    assert_one_error_line(cli("generate", "--runs-dir", runs_dir), "no trained run in", "lstmlm train")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(("--temperature", "-1"), "--temperature"), (("--top-p", "2"), "--top-p"), (("--length", "x"), "--length"), (("--bogus",), "--bogus")],
)
def test_generate_usage_errors_exit_2(trained: Path, args: tuple[str, ...], fragment: str) -> None:
    assert_usage_error(cli("generate", "--run", "d2l", "--runs-dir", trained, *args), fragment)


def test_generate_min_p_0_is_plain_sampling_and_a_stop_string_cuts_the_text(trained: Path) -> None:
    args = ["generate", "--run", "raw", "--runs-dir", trained, "--prefix", "the", "--length", "120", "--temperature", "1", "--seed", "2"]
    plain = cli(*args)
    assert plain.code == 0 and cli(*args, "--min-p", "0").stdout == plain.stdout
    assert cli(*args, "--min-p", "0.2").stdout != plain.stdout  # the option is applied
    continuation = plain.stdout[len("the") : -1]
    stop = continuation[30:32]
    stopped = cli(*args, "--stop", stop, "--stop", "no such text")
    assert stopped.code == 0 and stopped.stdout == "the" + continuation[: continuation.find(stop)] + "\n"


def test_generate_stop_takes_escapes(trained: Path) -> None:
    args = ["generate", "--run", "raw", "--runs-dir", trained, "--prefix", "the", "--length", "300", "--temperature", "1", "--seed", "2"]
    plain = cli(*args).stdout
    assert "\n" in plain[:-1]  # the text has a line break to stop at
    assert cli(*args, "--stop", "\\n").stdout == plain[: plain.index("\n")] + "\n"


def test_text_that_is_not_ours_is_never_read_as_an_emoji_code(tmp_path: Path, runs_dir: Path) -> None:
    # Rich's consoles turned ":fire:" into 🔥: in several samples, in a run's name in an error line
    corpus = tmp_path / "colons.txt"
    corpus.write_text("the :fire: is hot\n" * 40, encoding="utf-8")
    assert cli("train", "--corpus", corpus, "--normalize", "raw", "--runs-dir", runs_dir, "--run", "colons", *TINY, "--epochs", "1").code == 0
    several = cli("generate", "--run", "colons", "--runs-dir", runs_dir, "--prefix", ":fire:", "--length", "3", "--num-samples", "2")
    assert several.code == 0 and several.stdout.count("\n:fire:") == 2, several.stdout
    assert_one_error_line(cli("generate", "--run", ":fire:", "--runs-dir", runs_dir), "no run at", ":fire:")


def test_several_samples_into_a_pipe_are_written_as_they_are(tmp_path: Path, runs_dir: Path) -> None:
    # Rich dropped a form feed, a bell, a carriage return... from each sample, where one sample kept them
    corpus = tmp_path / "controls.txt"
    corpus.write_text("page one\x0cpage two\x07\n" * 40, encoding="utf-8")
    assert cli("train", "--corpus", corpus, "--normalize", "raw", "--runs-dir", runs_dir, "--run", "controls", *TINY, "--epochs", "1").code == 0
    args = ["generate", "--run", "controls", "--runs-dir", runs_dir, "--prefix", "one\x0cpage\x07", "--length", "5", "--temperature", "1", "--seed", "3"]
    several = cli(*args, "--num-samples", "2")
    assert several.code == 0 and several.stdout.startswith("--- sample 1\n" + cli(*args).stdout), several.stdout  # sample 1: what the seed gives alone


def test_generate_carry_without_interactive_is_a_usage_error(trained: Path) -> None:
    assert_usage_error(cli("generate", "--run", "d2l", "--runs-dir", trained, "--carry"), "--carry")


def test_a_d2l_models_stop_string_is_read_as_it_writes_lowercase(trained: Path) -> None:
    # `--stop Time` never matched: a d2l model writes no capitals, and its stop strings were not lowercased
    args = ["generate", "--run", "d2l", "--runs-dir", trained, "--prefix", "the", "--length", "120", "--temperature", "1", "--seed", "2"]
    plain = cli(*args).stdout
    stop = plain[len("the") :][20:22]
    lowered = cli(*args, "--stop", stop)
    assert lowered.code == 0 and len(lowered.stdout) < len(plain)
    assert cli(*args, "--stop", stop.upper()).stdout == lowered.stdout


def test_a_stop_string_the_model_never_writes_is_one_line(trained: Path) -> None:
    # a stop string with a symbol outside the vocabulary could never end a sample, silently
    result = cli("generate", "--run", "d2l", "--runs-dir", trained, "--stop", "\\n\\n")
    assert_one_error_line(result, "the stop string '\\n\\n' can never appear: the model never writes '\\n'")


def test_generate_empty_stop_string_is_one_line(trained: Path) -> None:
    assert_one_error_line(cli("generate", "--run", "d2l", "--runs-dir", trained, "--stop", ""), "a stop string must not be empty")


def test_generate_on_a_corrupt_checkpoint_is_one_line(runs_copy: Path) -> None:
    path = runs_copy / "d2l" / "latest.pt"
    path.write_bytes(path.read_bytes()[:5000])
    assert_one_error_line(cli("generate", "--run", "d2l", "--runs-dir", runs_copy), "is corrupt or truncated")


def test_generate_on_a_malicious_checkpoint_is_one_line_and_runs_nothing(runs_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = runs_copy / "d2l" / "latest.pt"
    torch.save({**load_checkpoint(path), "evil": Payload(marker)}, path)
    assert_one_error_line(cli("generate", "--run", "d2l", "--runs-dir", runs_copy), "refusing to load", "plain weights")
    assert not marker.exists()


# ---- the bad-input matrix (train) -------------------------------------------------------------------


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture
def train_into(runs_copy: Path) -> Any:
    """Run `lstmlm train` with bad input next to existing runs; check it fails cleanly and
    changes nothing on disk."""

    def run(*args: str | Path, fragment: str, code: int = 1) -> Result:
        before = snapshot(runs_copy)
        result = cli("train", "--runs-dir", runs_copy, *TINY, "--epochs", "1", *args)
        (assert_one_error_line if code == 1 else assert_usage_error)(result, fragment, **({"code": code} if code == 1 else {}))
        assert snapshot(runs_copy) == before
        return result

    return run


def test_missing_corpus(train_into: Any, tmp_path: Path) -> None:
    train_into("--corpus", tmp_path / "nope.txt", fragment="corpus not found")


def test_empty_corpus(train_into: Any, tmp_path: Path) -> None:
    train_into("--corpus", write(tmp_path / "empty.txt", b""), fragment="is empty")


def test_corpus_empty_after_d2l_normalization(train_into: Any, tmp_path: Path) -> None:
    train_into("--corpus", write(tmp_path / "digits.txt", b"1234 5678\n"), "--normalize", "d2l", fragment="empty after d2l normalization")


def test_binary_corpus(train_into: Any, tmp_path: Path) -> None:
    train_into("--corpus", write(tmp_path / "model.bin", bytes(range(256)) * 20), fragment="looks binary")


def test_non_utf8_corpus(train_into: Any, tmp_path: Path) -> None:
    latin1 = ("caf\u00e9 na\u00efve " * 300).encode("latin-1")
    train_into("--corpus", write(tmp_path / "latin1.txt", latin1), fragment="UTF-8")


def test_corpus_shorter_than_one_batch(train_into: Any, tmp_path: Path) -> None:
    train_into("--corpus", write(tmp_path / "short.txt", b"the time traveller\n" * 3), fragment="too short for one batch of 8\u00d710")


def test_corpus_directory_without_files(train_into: Any, tmp_path: Path) -> None:
    (tmp_path / "emptydir").mkdir()
    train_into("--corpus", tmp_path / "emptydir", fragment="holds no files")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--lr", "-1"), "[train] lr must be positive"),
        (("--lr", "0"), "[train] lr must be positive"),
        (("--batch-size", "0"), "[data] batch_size must be at least 1"),
        (("--num-steps", "-3"), "[data] num_steps must be at least 1"),
        (("--dropout", "1.5"), "[model] dropout must be in [0, 1)"),
        (("--val-fraction", "1"), "[data] val_fraction must be in [0, 1)"),
        (("--epochs", "0"), "[train] epochs must be at least 1"),
        (("--model", "gru"), "[model] model must be one of scratch, cudnn, not 'gru'"),
        (("--optimizer", "rmsprop"), "[train] optimizer must be one of sgd, adam, adamw, not 'rmsprop'"),
        (("--iterator", "shuffled"), "[data] iterator must be one of sequential, random, not 'shuffled'"),
        (("--normalize", "lower"), "[data] normalize must be one of d2l, raw, bytes, auto, not 'lower'"),
        (("--hidden", str(2**70)), "[model] hidden is too large"),
        (("--run", "../elsewhere"), "--run must be a plain name, not '../elsewhere'"),
        (("--run", ".."), "--run must be a plain name"),
    ],
)
def test_invalid_option_values(train_into: Any, corpus_file: Path, args: tuple[str, ...], fragment: str) -> None:
    train_into("--corpus", corpus_file, *args, fragment=fragment)


@pytest.mark.parametrize(
    "args",
    [
        ("--hidden", "60000"),  # 14.4 billion parameters: once, the OOM killer ended this with no message
        ("--hidden", str(10**15)),  # past any address space
        ("--embedding", str(2**62)),  # past torch's sizes ("Storage size calculation overflowed")
        ("--layers", "10000000"),  # a small layer, many times over
    ],
)
def test_a_model_too_large_for_memory_is_refused_before_the_run_is_made(runs_copy: Path, corpus_file: Path, args: tuple[str, ...]) -> None:
    cfg = Config().with_overrides({"corpus": str(corpus_file), "normalize": "raw", "hidden": 16, "batch_size": 8, "num_steps": 10}).resolved()
    cfg = cfg.with_overrides({args[0][2:].replace("-", "_"): int(args[1])})
    vocab_size = len(prepare_data(cfg).vocab)
    need, have = training_bytes(cfg, vocab_size), available_memory(torch.device("cpu"))
    if have is None or have >= need:
        pytest.skip(f"this machine has the memory ({have} bytes available, {need} needed)")
    before = snapshot(runs_copy)
    result = cli("train", "--runs-dir", runs_copy, *TINY, "--corpus", corpus_file, "--run", "big", *args)
    assert_one_error_line(result, "needs at least ", " GiB of memory and cpu has ", "available: lower --hidden, --layers, --embedding, --batch-size")
    assert snapshot(runs_copy) == before
    assert not (runs_copy / "big").exists()


@pytest.mark.parametrize(("model", "layers", "embedding"), [("scratch", 1, 0), ("scratch", 3, 0), ("cudnn", 2, 0), ("cudnn", 1, 12), ("scratch", 2, 5)])
def test_the_parameter_count_is_the_models(model: str, layers: int, embedding: int) -> None:
    cfg = Config().with_overrides({"model": model, "layers": layers, "embedding": embedding, "hidden": 24}).model
    assert num_parameters(cfg, 31) == sum(p.numel() for p in CharLM.from_config(cfg, 31).parameters())


def test_device_cuda_without_cuda(train_into: Any, corpus_file: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    train_into("--corpus", corpus_file, "--device", "cuda", fragment="--device cuda: no CUDA GPU is available here")


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[train]\nepochs = 3\nlearning_rate = 0.1\n", "unknown config key 'learning_rate' in [train]"),
        ("[optim]\nlr = 0.1\n", "unknown config table [optim]"),
        ('[train]\nepochs = "many"\n', "[train] epochs must be an int, not 'many'"),
        ("[train\nepochs = 3\n", "is not valid TOML"),
        ("epochs = 3\n", "unknown config table [epochs]"),
        ("[model]\ndropout = nan\n", "[model] dropout must be a finite number, not nan"),
        ("[model]\nhidden = 1e999\n", "[model] hidden must be an int, not inf"),
    ],
)
def test_bad_config_files(train_into: Any, corpus_file: Path, tmp_path: Path, toml: str, fragment: str) -> None:
    path = write(tmp_path / "bad.toml", toml.encode())
    result = train_into("--config", path, "--corpus", corpus_file, fragment=fragment)
    assert str(path) in result.stderr


def test_missing_and_non_utf8_config_files(train_into: Any, corpus_file: Path, tmp_path: Path) -> None:
    train_into("--config", tmp_path / "nope.toml", "--corpus", corpus_file, fragment="config file not found")
    train_into("--config", write(tmp_path / "latin1.toml", "# caf\u00e9\n".encode("latin-1")), "--corpus", corpus_file, fragment="cannot read config file")


@pytest.mark.parametrize(("args", "fragment"), [(("--epochs", "many"), "--epochs"), (("--hidden",), "--hidden"), (("--nope",), "--nope")])
def test_train_usage_errors_exit_2(train_into: Any, corpus_file: Path, args: tuple[str, ...], fragment: str) -> None:
    train_into("--corpus", corpus_file, *args, fragment=fragment, code=2)


def test_new_run_with_an_existing_name_is_refused(train_into: Any, corpus_file: Path) -> None:
    train_into("--corpus", corpus_file, "--normalize", "d2l", "--run", "d2l", fragment="already exists: continue it with --resume")


def test_resume_of_a_missing_run(train_into: Any) -> None:
    train_into("--resume", "--run", "nope", fragment="no run at")


# ---- failures during training ------------------------------------------------------------------------


def test_diverging_training_is_one_line(tiny_train_args: list[str], runs_dir: Path) -> None:
    result = cli(*tiny_train_args, "--lr", "1e6", "--clip", "0", "--run", "nan")
    assert_one_error_line(result, "learning rate too high?", "training stopped and no checkpoint was written", during_training=True)
    assert not (runs_dir / "nan" / "latest.pt").exists()


def test_disk_full_during_training_is_one_line_and_the_checkpoint_survives(tiny_train_args: list[str], runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    before = {name: (runs_dir / "r" / name).read_bytes() for name in ("latest.pt", "best.pt")}

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3")
    assert_one_error_line(result, f"cannot write the checkpoint {runs_dir / 'r'}", ".pt: No space left on device", during_training=True)
    assert {name: (runs_dir / "r" / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    # the space is back: the run resumes from the surviving checkpoint and finishes
    records = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3", "--json").json()
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [3]


# ---- evaluate ---------------------------------------------------------------------------------------


def test_evaluate_on_the_validation_text_gives_the_figure_training_reported(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    records = cli(*tiny_train_args, "--val-fraction", "0.2", "--run", "v", "--json").json()
    reported = records[-1]["val_perplexity"]
    data = prepare_data(RunStore.open(runs_dir / "v").config)
    val = tmp_path / "val.txt"
    val.write_text(data.vocab.decode(data.val), encoding="utf-8")
    result = cli("evaluate", val, "--run", "v", "--runs-dir", runs_dir, "--json")
    assert result.code == 0, result.stderr
    (score,) = result.json()
    assert score["perplexity"] == pytest.approx(reported, rel=1e-9)
    assert score["bits_per_char"] == pytest.approx(math.log2(reported), rel=1e-9)
    streams = 8  # the batch size: the text is read as 8 rows, each row's first character unpredicted
    assert (score["characters"], score["predicted"], score["unknown_characters"]) == (len(data.val), streams * ((len(data.val) - 1) // streams), 0)
    human = cli("evaluate", val, "--run", "v", "--runs-dir", runs_dir)
    assert human.stdout.startswith(f"{val}: perplexity {reported:.3f}, ") and "0 outside the vocabulary" in human.stdout


def test_evaluate_counts_the_characters_outside_the_vocabulary(trained: Path, tmp_path: Path) -> None:
    text = tmp_path / "odd.txt"
    text.write_text("the time ☃☃ traveller é\n", encoding="utf-8")
    (score,) = cli("evaluate", text, "--run", "raw", "--runs-dir", trained, "--json").json()
    assert score["unknown_characters"] == 3 and score["characters"] == len(text.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("missing.txt",), "corpus file not found"),
        (("{empty}",), "is empty"),
        (("{empty}", "--run", "nope"), "no run at"),
        (("{empty}", "--best"), "has no best checkpoint"),
        (("{one}",), "a text of 1 character is too short to evaluate: it takes 2"),
    ],
)
def test_evaluate_errors_are_one_line(trained: Path, runs_copy: Path, tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    empty, one = tmp_path / "empty.txt", tmp_path / "one.txt"
    empty.write_text("", encoding="utf-8")
    one.write_text("t", encoding="utf-8")
    (runs_copy / "d2l" / "best.pt").unlink(missing_ok=True)
    args = tuple(a.format(empty=empty, one=one) for a in args)
    run = () if "--run" in args else ("--run", "d2l")
    assert_one_error_line(cli("evaluate", *args, *run, "--runs-dir", runs_copy), fragment)


def test_evaluate_of_an_empty_file_name_is_one_line_not_this_whole_directory(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'' as a Path is '.': evaluate scored every file below the working directory."""
    (tmp_path / "notes.txt").write_text("time traveller\n" * 20, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = cli("evaluate", "", "--run", "d2l", "--runs-dir", trained)
    assert_one_error_line(result, "give a FILE to score, or --part val|test for the run's own text (not both)")


def test_a_corpus_given_relative_is_read_again_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run kept `--corpus notes.txt` as typed: `evaluate --part val` and `--resume` from
    another working directory found no corpus (or another file of that name)."""
    made, elsewhere, runs = tmp_path / "made", tmp_path / "elsewhere", tmp_path / "runs"
    made.mkdir(), elsewhere.mkdir()
    (made / "notes.txt").write_text("the time traveller for so it will be convenient to speak of him\n" * 60, encoding="utf-8")
    (elsewhere / "notes.txt").write_text("another text of the same name\n" * 60, encoding="utf-8")
    monkeypatch.chdir(made)
    started = ["train", "--corpus", "notes.txt", "--runs-dir", runs, "--run", "r", *TINY, "--epochs", "1", "--json"]
    assert cli(*started).code == 0
    assert json.loads((runs / "r" / "config.json").read_text())["data"]["corpus"] == str(made / "notes.txt")
    assert cli(*started[:-3], "--epochs", "2", "--resume", "--json").code == 0  # the command that started it, from where it started
    monkeypatch.chdir(elsewhere)
    scored = cli("evaluate", "--part", "val", "--run", "r", "--runs-dir", runs, "--json")
    assert scored.code == 0, scored.stderr
    resumed = cli("train", "--runs-dir", runs, "--run", "r", "--resume", "--epochs", "3", "--json")
    assert resumed.code == 0 and [e["epoch"] for e in resumed.json() if e["event"] == "epoch"] == [3], resumed.stderr
    refused = cli(*started[:-3], "--epochs", "4", "--resume")  # here notes.txt is another file
    assert_one_error_line(refused, "--resume keeps the run's stored corpus")


# ---- --run is a name under --runs-dir, in every command --------------------------------------------


@pytest.mark.parametrize("command", [("train",), ("generate",), ("evaluate", "x.txt"), ("inspect", "--text", "abc"), ("export",), ("plot",)])
@pytest.mark.parametrize("name", ["/tmp/x", "../elsewhere", ".."])
def test_run_must_be_a_plain_name_everywhere(trained: Path, command: tuple[str, ...], name: str) -> None:
    """`lstmlm train --run /tmp/x` and `lstmlm generate --run /tmp/x` alike: a name under --runs-dir, never a path."""
    before = sorted(p.name for p in trained.iterdir())
    args = [*command, name] if command == ("plot",) else [*command, "--run", name]
    assert_one_error_line(cli(*args, "--runs-dir", trained), "--run must be a plain name", "--runs-dir")
    assert sorted(p.name for p in trained.iterdir()) == before  # nothing made


@pytest.mark.parametrize("command", [("train", "--corpus", "x.txt"), ("generate",), ("runs",), ("runs", "show", "r"), ("serve",)])
def test_an_empty_runs_dir_is_a_usage_error_not_this_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]) -> None:
    """`--runs-dir "$RUNS"` with RUNS unset: as a Path '' is '.', and this directory's folders
    were taken for runs (a training made its run here)."""
    monkeypatch.chdir(tmp_path)
    args = [*command[:1], "--runs-dir", "", *command[1:]] if command[0] == "runs" else [*command, "--runs-dir", ""]
    assert_usage_error(cli(*args), "Invalid value for '--runs-dir'", "is empty")
    assert list(tmp_path.iterdir()) == []


# ---- commands that do not train start without torch -------------------------------------------------


@pytest.mark.parametrize("command", ["--help", "download", "plot"])
def test_commands_that_do_not_train_never_import_torch(command: str, http_server: LoopbackServer, serve_dir: Path, tmp_path: Path) -> None:
    (serve_dir / "corpus.txt").write_text("abc abc\n", encoding="utf-8")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(Config().to_json(), encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_perplexity": 9.0}\n{"epoch": 2, "train_perplexity": 5.0}\n', encoding="utf-8")
    args = {
        "--help": ["--help"],
        "download": ["download", http_server.url("corpus.txt"), "--dir", str(tmp_path / "cache")],
        "plot": ["plot", "r", "--runs-dir", str(tmp_path / "runs")],
    }[command]
    assert_no_torch(*args)


def test_tf32_is_a_stored_option_and_a_config_bool(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    assert cli(*tiny_train_args, "--tf32", "--run", "t").code == 0
    assert json.loads((runs_dir / "t" / "config.json").read_text())["train"]["tf32"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\ntf32 = 1\n")
    assert_one_error_line(cli(*tiny_train_args, "--config", bad, "--run", "u"), "[train] tf32 must be true or false, not 1")


def test_bench_refuses_a_model_too_large_for_memory_before_building_it(tmp_path: Path) -> None:
    """bench built whatever its config asked: a size a little past the memory there is would be
    ended by the OOM killer with no message, as a training was before it was checked."""
    config = tmp_path / "big.toml"
    config.write_text("[model]\nhidden = 60000\n")  # 14.4 billion parameters
    need, have = training_bytes(Config().with_overrides({"hidden": 60000}), 28), available_memory(torch.device("cpu"))
    if have is None or have >= need:
        pytest.skip(f"this machine has the memory ({have} bytes available, {need} needed)")
    result = cli("bench", "--config", config, "--steps", "1", "--device", "cpu")
    assert_one_error_line(result, "needs at least ", " GiB of memory and cpu has ", "available: lower --vocab-size, or the config's sizes")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (RuntimeError("Storage size calculation overflowed with sizes=[4611686018427387904, 2]"), "out of memory: lower --hidden"),
        (RuntimeError("value cannot be converted to type float without overflow"), "internal error: RuntimeError: value cannot be converted"),
    ],
)
def test_only_a_size_past_torchs_integers_reads_as_out_of_memory(error: RuntimeError, line: str) -> None:
    """Any 'overflow' read as out of memory: an lr past float32's told the user to lower --hidden."""
    assert one_line(error, "train").startswith(line)


def test_out_of_memory_names_the_options_of_the_command_that_ran_out() -> None:
    """bench has no --hidden: its hint names what it has."""
    result = cli("bench", "--vocab-size", "100000000000", "--steps", "1", "--device", "cpu")
    assert_one_error_line(result, "GiB of memory and cpu has ", "available: lower --vocab-size, or the config's sizes")
