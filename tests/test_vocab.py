"""The character vocabulary: d2l order, unknown characters, round trips, JSON, chunked encoding."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import lstmlm.vocab
from lstmlm.errors import VocabError
from lstmlm.vocab import UNK, Vocab

SAMPLES = {
    "ascii": "The Time Traveller (for so it will be convenient to speak of him)\nwas expounding.",
    "cjk": "时间机器，威尔斯著。時間旅行者は説明していた。시간 여행자",
    "accented": "Ünïcödé café, crème brûlée, naïve façade, Œuvre, ﬁ ligature, e\u0301 combining",
    "emoji": "😀 party 🎉 music 𝄞 family 👨‍👩‍👧 flag 🇯🇵 math 𝔸𝔹 done",
}


def d2l_order(text: str) -> list[str]:
    """The seed's Vocab: a Counter (first-seen order) sorted stably by descending count."""
    counts = collections.Counter(text)
    return [UNK] + [c for c, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]


@pytest.mark.parametrize("text", ["hello world", "abcabcab", "zyxxyz  ", "the time machine by h g wells", *SAMPLES.values()])
def test_frequency_order_matches_d2l(text: str) -> None:
    assert Vocab.build(text).tokens == d2l_order(text)


def test_ties_keep_first_seen_order() -> None:
    assert Vocab.build("cbaabc").tokens == [UNK, "c", "b", "a"]
    assert Vocab.build("xyyzz").tokens == [UNK, "y", "z", "x"]


def test_codepoint_order_and_no_unk() -> None:
    vocab = Vocab.build("cabbage 😀", order="codepoint", unk=False)
    assert vocab.tokens == [" ", "a", "b", "c", "e", "g", "😀"]
    assert not vocab.has_unk


def test_unknown_order_is_an_error() -> None:
    with pytest.raises(VocabError, match="unknown vocabulary order 'alphabet'"):
        Vocab.build("abc", order="alphabet")


def test_unk_is_index_zero() -> None:
    vocab = Vocab.build("hello")
    assert vocab.tokens[0] == UNK
    assert vocab.index[UNK] == 0


def test_unknown_chars_map_to_unk() -> None:
    vocab = Vocab.build("abc")
    assert vocab.encode("axbé😀c").tolist() == [1, 0, 2, 0, 0, 3]


def test_unknown_chars_without_unk_are_listed() -> None:
    vocab = Vocab.build("abc~", unk=False)  # x and z fall inside the code-point table, é and 😀 past it
    with pytest.raises(VocabError) as caught:
        vocab.encode("abxzzé😀~")
    assert str(caught.value) == "characters outside the vocabulary: 'x' 'z' 'é' '😀'"


def test_unk_token_text_is_not_a_character() -> None:
    vocab = Vocab.build("<unk>")
    assert vocab.encode("<unk>").tolist() == [vocab.index[c] for c in "<unk>"]
    assert vocab.unknown_chars("<k>!") == ["!"]


@pytest.mark.parametrize("name", SAMPLES)
def test_encode_decode_round_trip(name: str) -> None:
    text = SAMPLES[name]
    vocab = Vocab.build(text)
    ids = vocab.encode(text)
    assert ids.dtype == torch.int32
    assert len(ids) == len(text)  # one id per code point, astral-plane characters included
    assert ids.tolist() == [vocab.tokens.index(c) for c in text]
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text


def test_astral_plane_characters_are_single_tokens() -> None:
    vocab = Vocab.build("😀𝄞😀", unk=False)
    assert vocab.tokens == ["😀", "𝄞"]
    assert vocab.encode("𝄞😀𝄞").tolist() == [1, 0, 1]


def test_decode_out_of_range_is_an_error() -> None:
    with pytest.raises(VocabError, match="outside the vocabulary of 4 tokens"):
        Vocab.build("abc").decode([1, 4])


@pytest.mark.parametrize("name", SAMPLES)
def test_json_round_trip(name: str) -> None:
    vocab = Vocab.build(SAMPLES[name])
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab
    assert again.tokens == vocab.tokens
    assert again.encode(SAMPLES[name]).tolist() == vocab.encode(SAMPLES[name]).tolist()


def test_json_round_trip_without_unk() -> None:
    vocab = Vocab.build("😀 abc", unk=False)
    again = Vocab.from_json(vocab.to_json())
    assert again.tokens == vocab.tokens
    assert not again.has_unk


def vocab_json(**fields: object) -> str:
    data: dict[str, object] = {"format": "lstmlm-vocab", "version": 1, "tokens": [UNK, "a", "b"]}
    data.update(fields)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "lstmlm-vocab", "tokens": [', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not an lstmlm vocabulary"),
        (vocab_json(format="other-vocab"), "not an lstmlm vocabulary"),
        (vocab_json(version=2), "version 2 is not supported"),
        (vocab_json(tokens="ab"), "must be a list of strings"),
        (vocab_json(tokens=[UNK, "a", 3]), "must be a list of strings"),
        (vocab_json(tokens=[UNK, "a", "a"]), "distinct single characters"),
        (vocab_json(tokens=["a", "bc"]), "distinct single characters"),
        (vocab_json(tokens=[UNK]), "at least one character"),
    ],
)
def test_malformed_json_is_a_vocab_error(text: str, message: str) -> None:
    with pytest.raises(VocabError, match=message):
        Vocab.from_json(text)


def test_chunked_encode_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(SAMPLES.values()) * 3
    vocab = Vocab.build(text)
    whole = vocab.encode(text)
    monkeypatch.setattr(lstmlm.vocab, "CHUNK_CHARS", 7)
    assert vocab.encode(text).tolist() == whole.tolist()
    assert Vocab.build(text).tokens == vocab.tokens == d2l_order(text)


def test_chunked_encode_reports_unknowns_from_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lstmlm.vocab, "CHUNK_CHARS", 4)
    vocab = Vocab.build("abcd", unk=False)
    with pytest.raises(VocabError, match=r"'x' 'y' '😀'$"):
        vocab.encode("axbcdabcd😀bcdaby")


def test_lone_surrogate_is_an_unknown_character() -> None:
    # what sys.argv holds for an undecodable byte on POSIX (surrogateescape)
    assert Vocab.build("abc").encode("a\udcffb").tolist() == [1, 0, 2]
    with pytest.raises(VocabError, match=r"outside the vocabulary: '\\udcff'$"):
        Vocab.build("abc", unk=False).encode("a\udcffb")
