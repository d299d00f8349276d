"""Downloading against a loopback server: verified files or clear errors, never a partial file.

Timeouts and retries are shrunk so a stalled server costs a fraction of a second, and the
backoff between retries is recorded instead of slept.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import lstmlm.data.transfer as transfer
from lstmlm.data.download import Target, cached_name, download, resolve_target, sha1_of
from lstmlm.data.text import summarize
from lstmlm.errors import DownloadError

from support.cli import Result, assert_one_error_line, cli
from support.loopback import (
    BAD_GZIP,
    BROTLI,
    CUT,
    DRIP,
    ENDLESS,
    GZIP,
    GZIP_BOMB,
    GZIP_CUT,
    NOT_FOUND,
    SERVER_ERROR,
    STALL,
    STALL_BODY,
    UNSATISFIABLE,
    WRONG_RANGE,
    Cut,
    LoopbackServer,
    etag_of,
)

PAYLOAD = ("The Time Traveller — “quoted”, naïve, 時間, 😀.\n" * 4000).encode("utf-8")
PAYLOAD_SHA1 = hashlib.sha1(PAYLOAD).hexdigest()
WRONG_SHA1 = "0" * 40
OFFLINE_HINT = "(offline? train on a local file instead: lstmlm train --corpus PATH)"


@pytest.fixture(autouse=True)
def fast_network(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Short timeouts, one retry, and the backoff sleeps recorded rather than slept."""
    monkeypatch.setattr(transfer, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(transfer, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(transfer, "RETRIES", 1)
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return sleeps


@pytest.fixture
def served(serve_dir: Path, http_server: LoopbackServer) -> LoopbackServer:
    """The loopback server with `corpus.txt` (PAYLOAD: multi-byte UTF-8, several chunks) in it."""
    (serve_dir / "corpus.txt").write_bytes(PAYLOAD)
    return http_server


@pytest.fixture
def mirror(data_dir: Path, start_server: Callable[[Path], LoopbackServer]) -> LoopbackServer:
    """A loopback mirror of the real corpora, served straight from the test data directory."""
    return start_server(data_dir)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def target_for(server: LoopbackServer, cache: Path, sha1: str | None = PAYLOAD_SHA1) -> Target:
    return resolve_target(server.url("corpus.txt"), sha1=sha1, directory=cache)


def assert_nothing_written(directory: Path) -> None:
    """No file at the destination and no temporary .part file left beside it."""
    leftovers = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert leftovers == []


# ---- the library ----


def test_success_writes_the_verified_file(served: LoopbackServer, cache: Path) -> None:
    path = download(target_for(served, cache))
    assert path == cache / cached_name(served.url("corpus.txt"))
    assert re.fullmatch(r"corpus-[0-9a-f]{10}\.txt", path.name)
    assert path.read_bytes() == PAYLOAD
    assert sha1_of(path) == PAYLOAD_SHA1
    assert sorted(p.name for p in cache.iterdir()) == [path.name]
    assert served.requests == ["/corpus.txt"]


def test_a_scheme_in_capitals_is_a_url_as_any(served: LoopbackServer, cache: Path) -> None:
    url = served.url("corpus.txt").replace("http://", "HTTP://")
    assert download(resolve_target(url, sha1=PAYLOAD_SHA1, directory=cache)).read_bytes() == PAYLOAD


def test_progress_reports_every_byte(served: LoopbackServer, cache: Path) -> None:
    reports: list[tuple[int, int | None]] = []
    download(target_for(served, cache), progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def test_known_corpus_from_a_mirror(mirror: LoopbackServer, cache: Path, data_dir: Path) -> None:
    target = resolve_target("timemachine", url=mirror.url("timemachine.txt"), directory=cache)
    path = download(target)
    assert path == cache / "timemachine.txt"
    assert sha1_of(path) == "090b5e7e70c295757f55df93cb0a180b9691891a"
    assert path.read_bytes() == (data_dir / "timemachine.txt").read_bytes()


def test_default_cache_is_lstmlm_home(served: LoopbackServer, isolated_cache: Path) -> None:
    path = download(resolve_target(served.url("corpus.txt"), sha1=PAYLOAD_SHA1))
    assert path == isolated_cache / cached_name(served.url("corpus.txt"))


def test_404_is_not_retried(served: LoopbackServer, cache: Path) -> None:
    url = served.url("missing.txt")
    with pytest.raises(DownloadError) as caught:
        download(resolve_target(url, directory=cache))
    assert str(caught.value) == f"{url}: HTTP 404 Not Found"
    assert served.requests == ["/missing.txt"]
    assert_nothing_written(cache)


def test_checksum_mismatch_leaves_no_file(served: LoopbackServer, cache: Path) -> None:
    url = served.url("corpus.txt")
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache, sha1=WRONG_SHA1))
    assert str(caught.value) == f"{url}: checksum mismatch (expected SHA-1 {WRONG_SHA1}, got {PAYLOAD_SHA1})"
    assert_nothing_written(cache)


def test_known_corpus_with_wrong_content_is_rejected(served: LoopbackServer, cache: Path) -> None:
    target = resolve_target("timemachine", url=served.url("corpus.txt"), directory=cache)
    with pytest.raises(DownloadError, match="checksum mismatch \\(expected SHA-1 090b5e7e70c2"):
        download(target)
    assert_nothing_written(cache)


def test_stalled_server_times_out(served: LoopbackServer, cache: Path, fast_network: list[float]) -> None:
    served.plan(STALL, STALL)
    url = served.url("corpus.txt")
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    assert str(caught.value) == f"{url}: timed out {OFFLINE_HINT}"
    assert len(served.requests) == 2  # the first attempt and one retry
    assert fast_network == [0.5]
    assert_nothing_written(cache)


def test_stall_mid_transfer_times_out(served: LoopbackServer, cache: Path) -> None:
    served.plan(STALL_BODY, STALL_BODY)  # the retry starts over (a 200 to its Range) and gets no further
    with pytest.raises(DownloadError, match=r"transfer cut short after \d+ bytes \(timed out\)$") as caught:
        download(target_for(served, cache))
    assert str(caught.value).startswith(served.url("corpus.txt"))
    assert_nothing_written(cache)


def test_connection_closed_mid_transfer_leaves_no_file(served: LoopbackServer, cache: Path) -> None:
    served.plan(CUT, CUT)  # the retry starts over (a 200 to its Range) and gets no further
    with pytest.raises(DownloadError, match="transfer cut short") as caught:
        download(target_for(served, cache))
    assert str(caught.value).startswith(served.url("corpus.txt"))
    assert_nothing_written(cache)


def test_server_error_then_success_is_retried(served: LoopbackServer, cache: Path, fast_network: list[float]) -> None:
    served.plan(SERVER_ERROR)
    path = download(target_for(served, cache))
    assert path.read_bytes() == PAYLOAD
    assert served.requests == ["/corpus.txt", "/corpus.txt"]
    assert fast_network == [0.5]


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (lambda server: server.plan(SERVER_ERROR, SERVER_ERROR), "HTTP 500 Internal Server Error"),  # past the retries
        (LoopbackServer.stop, "cannot connect (Connection refused)"),
    ],
    ids=["server-errors", "refused"],
)
def test_a_failed_download_says_why_and_how_to_work_offline(served: LoopbackServer, cache: Path, fault: Callable[[LoopbackServer], None], said: str) -> None:
    fault(served)
    url = served.url("corpus.txt")
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    assert str(caught.value) == f"{url}: {said} {OFFLINE_HINT}"
    assert_nothing_written(cache)


def test_cached_file_needs_no_network(served: LoopbackServer, cache: Path) -> None:
    target = target_for(served, cache)
    first = download(target)
    served.stop()
    assert download(target) == first
    assert first.read_bytes() == PAYLOAD
    assert served.requests == ["/corpus.txt"]


def test_force_downloads_again(served: LoopbackServer, cache: Path) -> None:
    target = target_for(served, cache)
    download(target)
    assert download(target, force=True).read_bytes() == PAYLOAD
    assert served.requests == ["/corpus.txt", "/corpus.txt"]


def test_cached_file_with_wrong_checksum_is_replaced(served: LoopbackServer, cache: Path) -> None:
    cache.mkdir()
    target = target_for(served, cache)
    target.path.write_bytes(PAYLOAD[:-10])
    path = download(target)
    assert path.read_bytes() == PAYLOAD
    assert served.requests == ["/corpus.txt"]


def test_failed_force_keeps_the_good_cached_file(served: LoopbackServer, cache: Path) -> None:
    target = target_for(served, cache)
    download(target)
    served.plan(CUT, CUT)
    with pytest.raises(DownloadError, match="transfer cut short"):
        download(target, force=True)
    assert sorted(p.name for p in cache.iterdir()) == [target.path.name]
    assert target.path.read_bytes() == PAYLOAD


# ---- compressed, endless, dripping and bombing servers ----


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read timeout no busy machine reaches: these tests are about what the server sends."""
    monkeypatch.setattr(transfer, "READ_TIMEOUT_S", 30.0)


def test_a_gzipped_transfer_is_checked_on_the_wire_and_by_the_decoded_sha1(served: LoopbackServer, cache: Path, patient: None) -> None:
    """Content-Length counts the compressed bytes: the length check compares what came over
    the wire, the SHA-1 what was decoded."""
    served.plan(GZIP)
    wire = len(gzip.compress(PAYLOAD))
    assert wire < len(PAYLOAD) // 2
    reports: list[tuple[int, int | None]] = []
    path = download(target_for(served, cache), progress=lambda done, total: reports.append((done, total)))
    assert path.read_bytes() == PAYLOAD
    assert reports[-1] == (wire, wire)
    assert served.requests == ["/corpus.txt"]


def test_a_gzipped_transfer_without_a_checksum_is_the_decoded_text(served: LoopbackServer, cache: Path, patient: None) -> None:
    served.plan(GZIP)
    assert download(target_for(served, cache, sha1=None)).read_bytes() == PAYLOAD


def test_a_malformed_compressed_body_is_a_download_error(served: LoopbackServer, cache: Path, patient: None) -> None:
    served.plan(BAD_GZIP)
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    assert str(caught.value).startswith(f"{served.url('corpus.txt')}: the compressed body is malformed (")
    assert_nothing_written(cache)


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        # the gzip stream's end (its last block, its CRC and length) never came, though every byte
        # the Content-Length announced did: the decoded part was kept as the corpus, without a word
        (GZIP_CUT, "the compressed body is malformed (it ends before its compressed stream does)"),
        # Content-Encoding: br (brotli, not installed) was kept as it came, as if it were the text
        (BROTLI, "the body is encoded as 'br' (Content-Encoding), which lstmlm cannot decode"),
    ],
)
def test_a_body_that_cannot_be_decoded_whole_is_a_download_error(served: LoopbackServer, cache: Path, patient: None, plan: str, reason: str) -> None:
    served.plan(plan)
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache, sha1=None))
    assert str(caught.value) == f"{served.url('corpus.txt')}: {reason}"
    assert_nothing_written(cache)


def test_a_body_past_max_bytes_is_refused_and_leaves_nothing(served: LoopbackServer, cache: Path, patient: None) -> None:
    served.plan(ENDLESS)  # no length announced: only counting stops it
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache), max_bytes=1 << 20)
    assert str(caught.value) == f"{served.url('corpus.txt')}: the body is larger than --max-bytes 1,048,576"
    assert_nothing_written(cache)


def test_an_announced_length_past_max_bytes_is_refused_before_reading(served: LoopbackServer, cache: Path) -> None:
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache), max_bytes=1000)
    assert str(caught.value) == f"{served.url('corpus.txt')}: the server announces {len(PAYLOAD):,} bytes, more than --max-bytes 1,000"
    assert_nothing_written(cache)


def test_a_gzip_bomb_stops_at_max_bytes_of_decoded_text(served: LoopbackServer, cache: Path, patient: None) -> None:
    """A few KiB on the wire, 16 MiB inflated: the cap counts what the file would get."""
    served.plan(GZIP_BOMB)
    with pytest.raises(DownloadError, match=r"the body is larger than --max-bytes 1,048,576$"):
        download(target_for(served, cache), max_bytes=1 << 20)
    assert served.requests == ["/corpus.txt"]
    assert_nothing_written(cache)


def test_a_server_that_drips_is_given_up_on(served: LoopbackServer, serve_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, patient: None) -> None:
    """One byte every 50 ms never trips the read timeout; the rate does, after its window (0.5 s
    here, a minute by default). The whole drip would take 10 s."""
    monkeypatch.setattr(transfer, "RATE_WINDOW_S", 0.5)
    monkeypatch.setattr(transfer, "MIN_RATE_BYTES_S", 100)
    (serve_dir / "slow.txt").write_bytes(PAYLOAD[:200])
    served.plan(DRIP)
    url = served.url("slow.txt")
    with pytest.raises(DownloadError) as caught:
        download(resolve_target(url, directory=cache))
    assert re.fullmatch(re.escape(url) + r": too slow \(\d+ bytes in \d+ s, under 100 bytes/s\): given up after \d+ bytes", str(caught.value))
    assert_nothing_written(cache)


def test_two_urls_that_end_alike_keep_their_own_files(served: LoopbackServer, serve_dir: Path, cache: Path) -> None:
    for folder, text in (("a", b"first corpus\n"), ("b", b"second corpus\n")):
        (serve_dir / folder).mkdir()
        (serve_dir / folder / "input.txt").write_bytes(text)
    first = download(resolve_target(served.url("a/input.txt"), directory=cache))  # no --sha1: any cached copy counts
    second = download(resolve_target(served.url("b/input.txt"), directory=cache))
    assert first != second and first.name.startswith("input-") and first.suffix == ".txt"
    assert (first.read_bytes(), second.read_bytes()) == (b"first corpus\n", b"second corpus\n")
    assert served.requests == ["/a/input.txt", "/b/input.txt"]


def test_a_url_whose_name_is_longer_than_a_file_name_may_be_is_cached_under_a_shortened_one(served: LoopbackServer, serve_dir: Path, cache: Path) -> None:
    """A last segment of 300 bytes (100 percent-escaped letters, 時間 in UTF-8) made a cache name
    past the filesystem's 255 bytes: the download failed with 'File name too long'."""
    for name, escaped in (("x" * 100 + ".txt", "%78" * 100 + ".txt"), ("時間" * 40 + ".txt", "時間" * 40 + ".txt")):
        (serve_dir / name).write_bytes(PAYLOAD)
        path = download(resolve_target(served.url(escaped), sha1=PAYLOAD_SHA1, directory=cache))
        assert path.read_bytes() == PAYLOAD and path.suffix == ".txt" and len(path.name.encode()) <= 120
    assert cached_name(served.url("%78" * 100 + ".txt")) != cached_name(served.url("%78" * 101 + ".txt"))  # the URL's digest tells them apart


def test_the_summary_reads_a_block_at_a_time(tmp_path: Path) -> None:
    """Characters split across block edges are counted once; an 8 MiB file is summarized in
    under 16 MiB of memory (read whole, its bytes and its 4-byte-wide str take 26 MiB)."""
    path = tmp_path / "big.txt"
    unit = "naïve 時間 😀 ".encode()  # 1-, 2-, 3- and 4-byte characters: some straddle the 1 MiB blocks
    text_units = (8 << 20) // len(unit)
    path.write_bytes(unit * text_units)
    tracemalloc.start()
    try:
        summary = summarize(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (summary.bytes, summary.characters, summary.distinct) == (len(unit) * text_units, len(unit.decode()) * text_units, len(set(unit.decode())))
    assert peak < 16 << 20


@pytest.mark.parametrize(
    ("content", "distinct"),
    [
        (b"abc" * 400_000 + b"\xff", 4),  # not UTF-8 past the first block
        (b"a" * ((1 << 20) - 1) + "é".encode() + b"\x00", 4),  # a NUL byte: binary
        (b"a" * ((1 << 20) - 1) + "é".encode()[:1], 2),  # cut inside a character at the end
    ],
)
def test_a_file_that_is_not_text_is_summarized_in_bytes(tmp_path: Path, content: bytes, distinct: int) -> None:
    """Any file is a corpus in bytes mode: the summary counts its bytes, and says it is not text."""
    path = tmp_path / "odd.bin"
    path.write_bytes(content)
    summary = summarize(path)
    assert (summary.bytes, summary.characters, summary.distinct) == (len(content), None, distinct)


# ---- a transfer cut short is resumed ----


@pytest.mark.parametrize("cuts", [(60_000,), (1_000, 150_001)], ids=["once", "twice"])
def test_a_transfer_cut_short_is_resumed_where_it_stopped(served: LoopbackServer, cache: Path, fast_network: list[float], cuts: tuple[int, ...]) -> None:
    """Each attempt asks for the rest (Range) of the version it began (If-Range: its ETag); the
    parts make the whole, verified file, and the progress never goes back."""
    served.plan(*(Cut(at) for at in cuts))
    reports: list[tuple[int, int | None]] = []
    path = download(target_for(served, cache), progress=lambda done, total: reports.append((done, total)))
    assert path.read_bytes() == PAYLOAD and sorted(p.name for p in cache.iterdir()) == [path.name]
    assert served.asked == [(None, None)] + [(f"bytes={at}-", etag_of(PAYLOAD)) for at in cuts]
    assert fast_network == [0.5] * len(cuts)  # each part brought bytes: the backoff starts over
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert reports[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_a_ctrl_c_during_a_resumed_part_leaves_nothing(served: LoopbackServer, cache: Path) -> None:
    """No resume across invocations: the part held is the temporary file's, removed with it."""

    def interrupt_past_the_cut(done: int, total: int | None) -> None:
        if done > 60_000:
            raise KeyboardInterrupt

    served.plan(Cut(60_000))
    with pytest.raises(KeyboardInterrupt):
        download(target_for(served, cache), progress=interrupt_past_the_cut)
    assert served.asked[1][0] == "bytes=60000-"
    assert_nothing_written(cache)


@pytest.mark.parametrize(
    ("validator", "if_range"),
    [
        ("last-modified", r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT"),  # no ETag: the date names the version
        ("weak-etag", None),  # If-Range may not send a weak ETag (RFC 9110 13.1.5): started over
        ("none", None),  # nothing tells a changed file apart: started over
    ],
)
def test_a_resume_needs_a_strong_validator(served: LoopbackServer, cache: Path, validator: str, if_range: str | None) -> None:
    served.validator = validator
    served.plan(Cut(60_000))
    assert download(target_for(served, cache)).read_bytes() == PAYLOAD
    (_, first), (ranged, sent) = served.asked
    assert first is None
    if if_range is None:
        assert (ranged, sent) == (None, None)
    else:
        assert ranged == "bytes=60000-" and re.fullmatch(if_range, sent or "")


def test_a_server_that_ignores_ranges_starts_over(served: LoopbackServer, cache: Path) -> None:
    """It answers the Range request 200 with the whole file: the part held is thrown away."""
    served.ranges = False
    served.plan(Cut(60_000))
    reports: list[int] = []
    path = download(target_for(served, cache), progress=lambda done, total: reports.append(done))
    assert path.read_bytes() == PAYLOAD
    assert served.asked[1][0] == "bytes=60000-"
    assert reports[-1] == len(PAYLOAD) and 60_000 in reports  # it went back to the start


@pytest.mark.parametrize("sha1", [None, PAYLOAD_SHA1], ids=["no-sha1", "sha1"])
def test_a_file_that_changed_between_attempts_is_never_spliced(served: LoopbackServer, cache: Path, sha1: str | None) -> None:
    """If-Range names the version begun; the server has another, so it sends that one whole
    (200): the file is the new version whole, or, checked against the old one's SHA-1, nothing."""
    new = b"a shorter new version\n" * 1000  # than the 60,000 bytes held: none of them may stay
    served.plan(Cut(60_000, then=new))
    target = target_for(served, cache, sha1=sha1)
    if sha1 is None:
        assert download(target).read_bytes() == new
    else:
        with pytest.raises(DownloadError, match=f"checksum mismatch \\(expected SHA-1 {PAYLOAD_SHA1}, got {hashlib.sha1(new).hexdigest()}\\)"):
            download(target)
        assert_nothing_written(cache)
    assert served.asked[1] == ("bytes=60000-", etag_of(PAYLOAD))


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (WRONG_RANGE, f"the server answered 'bytes 30000-{len(PAYLOAD) - 1}/{len(PAYLOAD)}'"),
        (UNSATISFIABLE, "the server answered HTTP 416 Range Not Satisfiable"),
    ],
)
def test_a_wrong_answer_to_a_range_request_is_refused(served: LoopbackServer, cache: Path, answer: str, said: str) -> None:
    served.plan(Cut(60_000), answer)
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    assert str(caught.value).startswith(f"{served.url('corpus.txt')}: asked to resume at byte 60,000")
    assert str(caught.value).endswith(f"{said}: not resumed")
    assert len(served.requests) == 2
    assert_nothing_written(cache)


def test_a_body_whose_last_chunk_was_lost_is_whole(served: LoopbackServer, cache: Path) -> None:
    """Every byte came, chunked, but not the last (empty) chunk: asked for the rest, the server
    answers that there is none (416, 'bytes */236000'), and the file is the body, verified."""
    served.chunked = True
    served.plan(Cut(len(PAYLOAD)))
    assert download(target_for(served, cache)).read_bytes() == PAYLOAD
    assert served.asked[1][0] == f"bytes={len(PAYLOAD)}-"


def test_a_gzipped_body_cut_short_starts_over(served: LoopbackServer, cache: Path, patient: None) -> None:
    """A gzip stream cannot be picked up mid-way: the retry asks for the whole file again."""
    served.plan(Cut(len(gzip.compress(PAYLOAD)) // 2, gzip=True), GZIP)
    assert download(target_for(served, cache)).read_bytes() == PAYLOAD
    assert served.asked == [(None, None), (None, None)]


def test_only_attempts_that_bring_nothing_use_up_the_retries(
    served: LoopbackServer, cache: Path, fast_network: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two retries: each attempt that brings bytes gives them back (and starts the backoff over);
    a server that then keeps dropping at the same byte is given up on, with nothing left."""
    monkeypatch.setattr(transfer, "RETRIES", 2)
    served.plan(Cut(1_000), Cut(1_000), Cut(2_000), Cut(2_000), Cut(2_000))
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    cut_short = r": transfer cut short (after 2000 bytes \(connection lost\)|\(2000 of \d+ bytes\))"  # no offline hint: the server answered
    assert re.fullmatch(re.escape(served.url("corpus.txt")) + cut_short, str(caught.value))
    assert fast_network == [0.5, 1.0, 0.5, 1.0]
    assert [r for r, _ in served.asked] == [None, "bytes=1000-", "bytes=1000-", "bytes=2000-", "bytes=2000-"]
    assert_nothing_written(cache)


def test_a_download_that_keeps_moving_is_not_given_up_on(served: LoopbackServer, cache: Path) -> None:
    """Four drops, one retry allowed: every attempt brought bytes, so the download finishes."""
    served.plan(*(Cut(at) for at in (1_000, 2_000, 3_000, 4_000)))
    assert download(target_for(served, cache)).read_bytes() == PAYLOAD
    assert len(served.requests) == 5


@pytest.mark.parametrize(("max_bytes", "whole"), [(len(PAYLOAD), True), (150_000, False)])
def test_max_bytes_counts_every_part(served: LoopbackServer, cache: Path, max_bytes: int, whole: bool) -> None:
    """No length announced (chunked, '*' for a range's total): only the count over both parts
    (100,000 and 136,000 bytes, each under the cap) can stop a body larger than --max-bytes."""
    assert len(PAYLOAD) == 236_000
    served.chunked = True
    served.plan(Cut(100_000))
    target = target_for(served, cache)
    if whole:
        assert download(target, max_bytes=max_bytes).read_bytes() == PAYLOAD
    else:
        with pytest.raises(DownloadError) as caught:
            download(target, max_bytes=max_bytes)
        assert str(caught.value) == f"{served.url('corpus.txt')}: the body is larger than --max-bytes 150,000"
        assert_nothing_written(cache)
    assert served.asked[1][0] == "bytes=100000-"


def test_the_slow_server_rule_runs_across_the_parts(served: LoopbackServer, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that drops after every 1,000 bytes, and takes 10 s to answer again: each part
    comes fast, but 1,000 bytes in 10 s is under 1 KiB/s. The rate is the server's, not a part's."""
    clock = [0.0]
    monkeypatch.setattr(transfer, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + 10)))
    monkeypatch.setattr(transfer, "RATE_WINDOW_S", 15.0)
    served.plan(*(Cut(at) for at in range(1_000, 10_000, 1_000)))
    with pytest.raises(DownloadError) as caught:
        download(target_for(served, cache))
    too_slow = r": too slow \(3,000 bytes in 20 s, under 1,024 bytes/s\): given up after 3,000 bytes"
    assert re.fullmatch(re.escape(served.url("corpus.txt")) + too_slow, str(caught.value))
    assert_nothing_written(cache)


# ---- what to download ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name_or_url": "nope"}, "unknown corpus 'nope': use one of timemachine, tinyshakespeare, enwik8 or an http(s) URL"),
        ({"name_or_url": "ftp://example.com/a.txt"}, "unknown corpus 'ftp://example.com/a.txt'"),
        ({"name_or_url": "http://127.0.0.1/a.txt", "sha1": "abc"}, "--sha1 must be 40 hexadecimal digits, not 'abc'"),
        ({"name_or_url": "http://127.0.0.1/a.txt", "sha1": "g" * 40}, "--sha1 must be 40 hexadecimal digits"),
        ({"name_or_url": "timemachine", "sha1": WRONG_SHA1}, "'timemachine' has SHA-1 090b5e7e"),
        ({"name_or_url": "http://127.0.0.1/a.txt", "url": "http://127.0.0.1/b.txt"}, "--url is for a known corpus"),
        ({"name_or_url": "http://[::1/a.txt"}, "http://[::1/a.txt: not a valid URL (Invalid IPv6 URL)"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(DownloadError, match=re.escape(message)):
        resolve_target(**kwargs)


def test_known_corpora_and_their_checksums(cache: Path) -> None:
    assert resolve_target("timemachine", directory=cache) == Target(
        "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        "090b5e7e70c295757f55df93cb0a180b9691891a",
        cache / "timemachine.txt",
    )
    assert resolve_target("tinyshakespeare", directory=cache) == Target(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "04486597058d11dcc2c556b1d0433891eb639d2e",
        cache / "tinyshakespeare.txt",
    )


def test_uppercase_sha1_is_accepted(served: LoopbackServer, cache: Path) -> None:
    assert download(target_for(served, cache, sha1=PAYLOAD_SHA1.upper())).read_bytes() == PAYLOAD


# ---- the command ----


def invoke(*args: str) -> tuple[int, str, str]:
    result = cli("download", *args)
    return result.code, result.stdout, result.stderr


def assert_download_failed(code: int, stdout: str, stderr: str, *fragments: str) -> None:
    """One error line and nothing on stdout (a script reading the path gets none)."""
    assert_one_error_line(Result(code, stdout, stderr), *fragments)
    assert stdout == ""


def test_cli_downloads_tinyshakespeare_from_a_mirror(mirror: LoopbackServer, cache: Path) -> None:
    code, stdout, stderr = invoke("tinyshakespeare", "--url", mirror.url("tinyshakespeare.txt"), "--dir", str(cache))
    assert code == 0, stderr
    path = cache / "tinyshakespeare.txt"
    assert stdout.splitlines() == [str(path), "1,115,394 bytes, 1,115,394 characters, 65 distinct"]
    assert sha1_of(path) == "04486597058d11dcc2c556b1d0433891eb639d2e"


def test_cli_cache_hit_with_the_server_stopped(mirror: LoopbackServer, cache: Path) -> None:
    args = ("timemachine", "--url", mirror.url("timemachine.txt"), "--dir", str(cache))
    assert invoke(*args)[0] == 0
    mirror.stop()
    code, stdout, _ = invoke(*args)
    assert code == 0
    assert stdout.splitlines() == [str(cache / "timemachine.txt"), "178,979 bytes, 178,979 characters, 70 distinct"]
    assert mirror.requests == ["/timemachine.txt"]


def test_cli_counts_characters_not_bytes(served: LoopbackServer, cache: Path) -> None:
    code, stdout, _ = invoke(served.url("corpus.txt"), "--sha1", PAYLOAD_SHA1, "--dir", str(cache))
    text = PAYLOAD.decode("utf-8")
    assert code == 0
    assert stdout.splitlines()[1] == f"{len(PAYLOAD):,} bytes, {len(text):,} characters, {len(set(text)):,} distinct"


def test_cli_force_downloads_again(served: LoopbackServer, cache: Path) -> None:
    args = (served.url("corpus.txt"), "--sha1", PAYLOAD_SHA1, "--dir", str(cache))
    assert invoke(*args)[0] == 0
    assert invoke(*args, "--force")[0] == 0
    assert len(served.requests) == 2


@pytest.mark.parametrize(
    ("behaviour", "sha1", "fragment"),
    [
        (NOT_FOUND, PAYLOAD_SHA1, "HTTP 404"),
        (CUT, PAYLOAD_SHA1, "transfer cut short"),
        (STALL, PAYLOAD_SHA1, "timed out"),
        (None, WRONG_SHA1, f"checksum mismatch (expected SHA-1 {WRONG_SHA1}, got {PAYLOAD_SHA1})"),
    ],
)
def test_cli_network_failures_are_one_line(served: LoopbackServer, cache: Path, behaviour: str | None, sha1: str, fragment: str) -> None:
    if behaviour is not None:
        served.plan(behaviour, behaviour)
    url = served.url("corpus.txt")
    code, stdout, stderr = invoke(url, "--sha1", sha1, "--dir", str(cache))
    assert_download_failed(code, stdout, stderr, url, fragment)
    assert_nothing_written(cache)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("nope",), "unknown corpus 'nope'"),
        (("http://127.0.0.1/a.txt", "--sha1", "xyz"), "--sha1 must be 40 hexadecimal digits"),
        (("http://[::1/a.txt",), "http://[::1/a.txt: not a valid URL (Invalid IPv6 URL)"),
    ],
)
def test_cli_bad_requests_are_one_line(args: tuple[str, ...], fragment: str, cache: Path) -> None:
    code, stdout, stderr = invoke(*args, "--dir", str(cache))
    assert_download_failed(code, stdout, stderr, fragment)
    assert not cache.exists()


@pytest.mark.parametrize(
    ("behaviour", "args", "fragment"),
    [
        (BAD_GZIP, (), "the compressed body is malformed"),
        (GZIP_CUT, (), "the compressed body is malformed (it ends before its compressed stream does)"),
        (ENDLESS, ("--max-bytes", "100000"), "the body is larger than --max-bytes 100,000"),
        (GZIP_BOMB, ("--max-bytes", "100000"), "the body is larger than --max-bytes 100,000"),
    ],
)
def test_cli_hostile_servers_are_one_line(served: LoopbackServer, cache: Path, behaviour: str, args: tuple[str, ...], fragment: str, patient: None) -> None:
    served.plan(behaviour)
    url = served.url("corpus.txt")
    code, stdout, stderr = invoke(url, "--dir", str(cache), *args)
    assert_download_failed(code, stdout, stderr, url, fragment)
    assert_nothing_written(cache)


def test_cli_gzipped_download(served: LoopbackServer, cache: Path, patient: None) -> None:
    served.plan(GZIP)
    code, stdout, stderr = invoke(served.url("corpus.txt"), "--sha1", PAYLOAD_SHA1, "--dir", str(cache))
    assert code == 0, stderr
    assert stdout.splitlines()[1].startswith(f"{len(PAYLOAD):,} bytes, ")


def test_cli_resumes_a_transfer_cut_short(served: LoopbackServer, cache: Path) -> None:
    served.plan(Cut(60_000), Cut(120_000))
    code, stdout, stderr = invoke(served.url("corpus.txt"), "--sha1", PAYLOAD_SHA1, "--dir", str(cache))
    assert code == 0, stderr
    assert stdout.splitlines()[0] == str(cache / cached_name(served.url("corpus.txt")))
    assert [r for r, _ in served.asked] == [None, "bytes=60000-", "bytes=120000-"]


def test_cli_refused_connection_is_one_line(served: LoopbackServer, cache: Path) -> None:
    served.stop()
    url = served.url("corpus.txt")
    code, stdout, stderr = invoke(url, "--dir", str(cache))
    assert_download_failed(code, stdout, stderr, url, "Connection refused", "lstmlm train --corpus PATH")
    assert_nothing_written(cache)


def test_cli_prints_the_path_verbatim(served: LoopbackServer, tmp_path: Path) -> None:
    cache = tmp_path / "[bold]not markup[/bold]" / ("a-directory-name-long-enough-to-wrap-" * 3)
    code, stdout, _ = invoke(served.url("corpus.txt"), "--sha1", PAYLOAD_SHA1, "--dir", str(cache))
    assert code == 0
    assert stdout.splitlines()[0] == str(cache / cached_name(served.url("corpus.txt")))


def test_python_m_lstmlm_failure_is_one_line(served: LoopbackServer, cache: Path) -> None:
    url = served.url("missing.txt")
    env = {**os.environ, "LSTMLM_DEBUG": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "lstmlm", "download", url, "--dir", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_download_failed(done.returncode, done.stdout, done.stderr, url, "HTTP 404")
    assert_nothing_written(cache)


def test_what_a_download_killed_midway_left_is_removed_by_the_next(served: LoopbackServer, cache: Path) -> None:
    """A kill -9 mid-transfer left `.NAME.XXXX.tmp`, as large as it got, in the cache for good."""
    target = target_for(served, cache)
    cache.mkdir()
    killed = cache / f".{target.path.name}.k1ll3d.tmp"
    killed.write_bytes(PAYLOAD[:100])
    other = cache / ".another-corpus.txt.k1ll3d.tmp"  # another file's: perhaps being written now
    other.write_bytes(b"x")
    download(target)
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.path.name, other.name])


def test_two_processes_fetching_one_corpus_fetch_it_once(served: LoopbackServer, serve_dir: Path, cache: Path) -> None:
    """Two ranks of a torchrun on a corpus not cached yet each downloaded it whole: the second
    waits for the first's download (which drips for 3 s) and finds it cached."""
    body = b"sixty bytes of a corpus that the server drips out slowly..\n"
    (serve_dir / "slow.txt").write_bytes(body)
    served.plan(DRIP)
    code = "import sys; from lstmlm.data.download import download, resolve_target; download(resolve_target(sys.argv[1], directory=sys.argv[2]))"
    runs = [subprocess.Popen([sys.executable, "-c", code, served.url("slow.txt"), str(cache)]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in runs] == [0, 0]
    assert served.requests == ["/slow.txt"]
    assert resolve_target(served.url("slow.txt"), directory=cache).path.read_bytes() == body
