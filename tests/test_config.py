"""The defaults a corpus gets: the d2l corpus keeps the seed; anything else is read raw, whole,
with a validation split; a known corpus may bring its own mode and split. And the split's syntax."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lstmlm import config_file
from lstmlm.config import Config, parse_split
from lstmlm.errors import ConfigError

from support.cli import assert_one_error_line, cli, lstmlm_process
from support.tiny import CONFIGS

SEED = ("d2l", 10_000, 0.0, "")


def data_of(cfg: Config) -> tuple[str, int, float, str]:
    d = cfg.resolved().data
    return d.normalize, d.max_tokens, d.val_fraction, d.split


def test_the_d2l_corpus_keeps_the_seed() -> None:
    assert data_of(Config()) == SEED  # plain `lstmlm train`
    assert data_of(config_file.load(CONFIGS / "d2l.toml")) == SEED
    seed = config_file.load(CONFIGS / "d2l.toml").resolved()
    assert (seed.data.batch_size, seed.data.num_steps, seed.model.hidden, seed.train.lr, seed.train.epochs) == (32, 35, 256, 1.0, 500)


@pytest.mark.parametrize("corpus", ["mybook.txt", "books/", "linux/**/*.[ch]", "tinyshakespeare", "/data/timemachine.txt"])
def test_any_other_corpus_is_read_raw_whole_with_a_validation_split(corpus: str) -> None:
    assert data_of(Config().with_overrides({"corpus": corpus})) == ("raw", 0, 0.1, "")


def test_a_known_corpus_brings_its_mode_and_split() -> None:
    assert data_of(Config().with_overrides({"corpus": "enwik8"})) == ("bytes", 0, 0.0, "90M,5M,5M")
    assert data_of(Config().with_overrides({"corpus": "enwik8", "val_fraction": 0.1})) == ("bytes", 0, 0.1, "")  # the fraction form stays
    assert data_of(Config().with_overrides({"corpus": "enwik8", "normalize": "raw", "split": "80M,10M"})) == ("raw", 0, 0.0, "80M,10M")


def test_what_is_given_wins_over_the_defaults() -> None:
    given = Config().with_overrides({"corpus": "mybook.txt", "normalize": "d2l", "max_tokens": 500, "val_fraction": 0.2})
    assert data_of(given) == ("d2l", 500, 0.2, "")


@pytest.mark.parametrize(
    ("text", "sizes", "fractions"),
    [
        ("90M,5M,5M", (90e6, 5e6, 5e6), False),
        ("90k,5k", (90e3, 5e3), False),
        ("1G,1000,2", (1e9, 1000, 2), False),
        ("1.5M,500k", (1.5e6, 5e5), False),
        ("0.9,0.05,0.05", (0.9, 0.05, 0.05), True),
        ("0.8, 0.2", (0.8, 0.2), True),
    ],
)
def test_split_sizes(text: str, sizes: tuple[float, ...], fractions: bool) -> None:
    parsed = parse_split(text)
    assert parsed.sizes == pytest.approx(sizes) and parsed.fractions == fractions


@pytest.mark.parametrize("text", ["90M", "1,2,3,4", "90X,5M", "0.9,0.2", "0,5", "1.5,2", "0.5,5M", "a,b"])
def test_a_bad_split_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"\[data\] split"):
        Config().with_overrides({"split": text})


def test_split_and_val_fraction_are_not_both_given() -> None:
    with pytest.raises(ConfigError, match="either \\[data\\] split or \\[data\\] val_fraction"):
        Config().with_overrides({"split": "90k,5k", "val_fraction": 0.1})


def test_strict_is_a_flag(tmp_path: Path) -> None:
    assert Config().with_overrides({"strict": True}).data.strict is True
    with pytest.raises(ConfigError, match=r"\[data\] strict must be true or false, not 1"):
        Config().with_overrides({"strict": 1})
    path = tmp_path / "c.toml"
    path.write_text("[data]\nstrict = true\n")
    assert config_file.load(path).data.strict is True


def test_the_effective_settings_are_printed(corpus_file: Path, runs_dir: Path) -> None:
    """What "auto" became for this corpus is this run's choice: shown; defaults only with --verbose."""
    args = ["train", "--corpus", corpus_file, "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4", "--num-steps", "5", "--epochs", "1"]

    def table(*more: str) -> set[tuple[str, ...]]:
        result = cli(*args, *more)
        assert result.code == 0, result.stderr
        return {tuple(line.split()[:2]) for line in result.stdout.splitlines()} | {tuple(line.split()[2:4]) for line in result.stdout.splitlines()}

    plain, verbose = table(), table("--verbose")
    assert {("normalize", "raw"), ("max_tokens", "0"), ("val_fraction", "0.1"), ("hidden", "8")} <= plain
    assert not {("checkpoint_every", "10m"), ("val_tokens", "250000")} & plain
    assert {("normalize", "raw"), ("checkpoint_every", "10m"), ("val_tokens", "250000")} <= verbose


# ---- regularization ---------------------------------------------------------------------------


def test_the_regularization_is_off_by_default() -> None:
    m, t = Config().model, Config().train
    assert (m.weight_drop, m.embedding_dropout, m.locked_dropout, t.ar, t.tar) == (0.0, 0.0, False, 0.0, 0.0)
    assert (m.dropout_input, m.dropout_hidden, m.dropout_output) == (-1.0, -1.0, -1.0)  # dropout's rate, which is 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embedding_dropout": 0.1}, "[model] embedding_dropout drops rows of the embedding matrix: it needs embedding > 0"),
        ({"dropout_input": 0.2}, "[model] dropout_input acts on the embedding's output: it needs embedding > 0"),
        ({"dropout_hidden": 0.2}, "[model] dropout_hidden acts between layers: it needs layers > 1"),
        ({"weight_drop": 1.0}, "[model] weight_drop must be in [0, 1)"),
        ({"weight_drop": -0.1}, "[model] weight_drop must be in [0, 1)"),
        ({"embedding_dropout": 1.0, "embedding": 8}, "[model] embedding_dropout must be in [0, 1)"),
        ({"dropout_output": 1.5}, "[model] dropout_output must be in [0, 1), or -1 for dropout's rate"),
        ({"dropout_hidden": -0.5, "layers": 2}, "[model] dropout_hidden must be in [0, 1), or -1 for dropout's rate"),
        ({"ar": -1.0}, "[train] ar must not be negative"),
        ({"tar": -0.5}, "[train] tar must not be negative"),
        ({"locked_dropout": 1}, "[model] locked_dropout must be true or false, not 1"),
    ],
)
def test_bad_regularization_is_refused_by_name(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Config().with_overrides(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden": "many"}, "[model] hidden must be an int, not 'many'"),
        ({"hidden": True}, "[model] hidden must be an int, not True"),
        ({"dropout": "half"}, "[model] dropout must be a float, not 'half'"),
        ({"dropout": False}, "[model] dropout must be a float, not False"),
        ({"corpus": 3}, "[data] corpus must be a string, not 3"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_article(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Config().with_overrides(overrides)


@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_an_lr_or_weight_decay_past_float32_is_refused_by_name(key: str) -> None:
    """Past float32's range the optimizer's first step failed ("value cannot be converted to type
    float without overflow"), which the CLI took for "out of memory", in a run already made."""
    assert Config().with_overrides({key: 3.4e38}).value(key) == 3.4e38
    why = f"[train] {key} must be at most 3.403e+38, float32's largest (the weights')"
    with pytest.raises(ConfigError, match=f"^{re.escape(why)}$"):
        Config().with_overrides({key: 1e39})


def test_awd_lstm_settings_are_accepted_and_plain_dropout_still_needs_nothing(tmp_path: Path) -> None:
    assert Config().with_overrides({"dropout": 0.5}).model.dropout == 0.5  # one-hot, one layer: as before
    path = tmp_path / "awd.toml"
    path.write_text(
        "[model]\nembedding = 16\nlayers = 3\ndropout_input = 0.65\ndropout_hidden = 0.3\ndropout_output = 0.4\n"
        "locked_dropout = true\nweight_drop = 0.5\nembedding_dropout = 0.1\n[train]\nar = 2\ntar = 1\n"
    )
    cfg = config_file.load(path)
    assert (cfg.model.weight_drop, cfg.model.locked_dropout, cfg.train.ar, cfg.train.tar) == (0.5, True, 2.0, 1.0)


def test_a_regularization_option_is_refused_in_one_line(corpus_file: Path, runs_dir: Path) -> None:
    result = cli("train", "--corpus", corpus_file, "--runs-dir", runs_dir, "--embedding-dropout", "0.1", "--epochs", "1")
    assert_one_error_line(result, "[model] embedding_dropout drops rows of the embedding matrix: it needs embedding > 0")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


@pytest.mark.parametrize(
    "cfg",
    [
        config_file.load(CONFIGS / "d2l.toml"),
        config_file.load(CONFIGS / "tinyshakespeare.toml").resolved(),
        Config().with_overrides({"corpus": 'odd "name"\\ \x1b\x7f é.txt', "lr": 1e-05, "max_minutes": 1e16, "tf32": True, "eval_every": "1e,10m"}),
    ],
)
def test_a_config_written_as_toml_reads_back_the_same(cfg: Config, tmp_path: Path) -> None:
    path = tmp_path / "written.toml"
    path.write_text(cfg.to_toml("a header\nof two lines"), encoding="utf-8")
    assert config_file.load(path) == cfg
    assert path.read_text(encoding="utf-8").startswith("# a header\n# of two lines\n\n[data]\n")


# ---- reading a config file: only a regular file, and only so much of it ---------------------------


def test_a_config_that_is_a_device_or_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)  # nobody writes: opening it to read would wait for ever
    for path in (Path("/dev/zero"), fifo):
        result = lstmlm_process("train", "--config", path, "--runs-dir", tmp_path / "runs")
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == f"error: config file {path} is not a regular file", result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_config_over_a_mebibyte_is_refused_and_a_directory_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("[train]\nepochs = 3\n" + "#" * (1 << 20) + "\n", encoding="utf-8")  # valid TOML, a comment of 1 MiB
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(big))} is larger than 1 MiB: not a config$"):
        config_file.load(big)
    with pytest.raises(ConfigError, match="is not a regular file"):
        config_file.load(tmp_path)
    fits = tmp_path / "fits.toml"
    fits.write_text("[train]\nepochs = 3\n" + "#" * ((1 << 20) - 64) + "\n", encoding="utf-8")
    assert config_file.load(fits).train.epochs == 3


def test_a_config_saved_with_a_byte_order_mark_reads_as_without_one(tmp_path: Path) -> None:
    """Windows' Notepad starts a UTF-8 file with a BOM, which TOML forbids: it is dropped."""
    path = tmp_path / "notepad.toml"
    path.write_bytes(b"\xef\xbb\xbf[train]\nepochs = 3\n")
    assert config_file.load(path).train.epochs == 3
    assert config_file.written_keys(path) == frozenset({"epochs"})
