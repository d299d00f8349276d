"""Fuzzing the readers of user files: config tables, TOML and JSON configs, vocabulary JSON.

Whatever the input, the only exception is the library's own clear error (ConfigError,
VocabError), which the CLI prints as one line; a valid input round-trips.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lstmlm import config, config_file
from lstmlm.errors import ConfigError, VocabError
from lstmlm.vocab import FORMAT as VOCAB_FORMAT
from lstmlm.vocab import Vocab

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = {name: [f.name for f in fields(cls)] for name, cls in config.SECTIONS.items()}

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)  # larger than any float
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["d2l", "raw", "scratch", "cudnn", "sgd", "adam", "cpu", "auto", "random", "sequential"])
)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@st.composite
def config_tables(draw: Any) -> dict[str, Any]:
    """Mostly-plausible configs: real table and key names with random values, some strays."""
    raw: dict[str, Any] = {}
    for table in draw(st.lists(st.sampled_from([*FIELDS, "extra"]), max_size=4, unique=True)):
        names = FIELDS.get(table, ["whatever"])
        keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=6), max_size=5, unique=True))
        raw[table] = {k: draw(scalars | json_values) for k in keys}
    return raw


@FUZZ
@given(st.one_of(config_tables(), json_values))
def test_from_dict_raises_only_config_errors(raw: Any) -> None:
    try:
        cfg = config.from_dict(raw)
    except ConfigError as e:
        assert str(e)
        return
    assert config_file.from_json(cfg.to_json()) == cfg  # what is accepted round-trips


@FUZZ
@given(st.text(max_size=200) | json_values.map(json.dumps) | config_tables().map(lambda d: json.dumps(d, default=str)))
def test_from_json_raises_only_config_errors(text: str) -> None:
    try:
        config_file.from_json(text)
    except ConfigError as e:
        assert str(e)


TOML_LINES = st.sampled_from(
    ["[data]", "[model]", "[train]", "[train.x]", "[[train]]", "[", "]", "=", '"', "'''", "#", "", "a.b = 1", "x = [", "y = {",
     "epochs = 3", "epochs = -1", "lr = 1e6", "lr = inf", "lr = nan", "hidden = 0x10", "hidden = 1_000", "dropout = 0.5",
     "corpus = \"\"", "model = 'cudnn'", "device = \"tpu\"", "when = 1979-05-27T07:32:00Z", "t = 07:32:00", "v = [1, 'a']",
     "batch_size = 99999999999999999999", "iterator = { a = 1 }", "normalize = true", "lr = " + "9" * 5000]
)  # fmt: skip


def nested(depth: int) -> str:
    return "x = " + "[" * depth + "]" * depth + "\n"


@FUZZ
@given(st.lists(TOML_LINES | st.text(max_size=30), max_size=12).map("\n".join) | st.integers(1, 5000).map(nested))
def test_toml_loader_raises_only_config_errors(tmp_path_factory: Any, text: str) -> None:
    path: Path = tmp_path_factory.mktemp("toml") / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config_file.load(path)
    except ConfigError as e:
        assert str(path) in str(e)


def test_deep_nesting_and_huge_numbers_are_clear_errors(tmp_path: Path) -> None:
    """Nesting that exhausts the parsers' recursion, or an integer past Python's 4300-digit
    limit, is a malformed file, not a crash."""
    for text in ("[" * 100_000 + "]" * 100_000, '{"data": ' * 100_000 + "1" + "}" * 100_000, "1" * 5000, '{"tokens": ' + "7" * 5000 + "}"):
        with pytest.raises(ConfigError, match="stored config is not valid JSON"):
            config_file.from_json(text)
        with pytest.raises(VocabError, match="vocabulary is not valid JSON"):
            Vocab.from_json(text)
    for toml in (nested(100_000), "[train]\nepochs = " + "1" * 5000 + "\n"):
        path = tmp_path / "deep.toml"
        path.write_text(toml)
        with pytest.raises(ConfigError, match="is not valid TOML") as e:
            config_file.load(path)
        assert len(str(e.value)) < 500  # one readable line
    with pytest.raises(ConfigError, match="\\[train\\] lr must be a finite number"):
        config.from_dict({"train": {"lr": 10**400}})


@st.composite
def vocab_documents(draw: Any) -> Any:
    tokens = draw(
        st.lists(st.characters(), max_size=12)
        | st.lists(st.text(max_size=3), max_size=6)
        | st.lists(st.characters(), max_size=8).map(lambda cs: ["<unk>", *cs])
        | json_values
    )
    doc = {"format": draw(st.just(VOCAB_FORMAT) | st.text(max_size=5)), "version": draw(st.just(1) | scalars), "tokens": tokens}
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2, unique=True)):
        del doc[key]
    return doc


@FUZZ
@given(st.text(max_size=200) | json_values.map(json.dumps) | vocab_documents().map(lambda d: json.dumps(d, ensure_ascii=False)))
def test_vocab_from_json_raises_only_vocab_errors(text: str) -> None:
    try:
        vocab = Vocab.from_json(text)
    except VocabError as e:
        assert str(e)
        return
    assert Vocab.from_json(vocab.to_json()) == vocab
    assume(len(vocab) > 1)
    chars = [t for t in vocab.tokens if t != "<unk>"]
    assert vocab.decode(vocab.encode("".join(chars))) == "".join(chars)
