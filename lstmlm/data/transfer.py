"""One HTTP body into a file, across as many attempts as it takes (download.py's transfer).

A body cut short (the connection lost, a read timeout, fewer bytes than announced) is resumed
where it stopped: a Range request whose If-Range names the version begun, so two versions are
never spliced; where it cannot be (a compressed body, no strong validator, a server that
ignores ranges) it starts over. It is bounded: at most `max_bytes` of text (however well it was
compressed on the wire), and a server that sends less than MIN_RATE_BYTES_S over RATE_WINDOW_S
is given up on. An attempt that brought new bytes gives the retries back; RETRIES in a row that
bring nothing end it. Every failure is a DownloadError of one line.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING

from ..errors import DownloadError

if TYPE_CHECKING:
    import requests

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
RETRIES = 3  # attempts after one that failed (a connection error, a 5xx answer, a body cut short); one that brings new bytes gives them back
CHUNK_BYTES = 1 << 16
MIN_RATE_BYTES_S = 1024  # a transfer slower than this over a whole RATE_WINDOW_S is given up on
RATE_WINDOW_S = 60.0  # (the read timeout alone never fires on a server that drips a byte at a time)

# progress(bytes_so_far, total_bytes_or_None) is called as the download streams.
Progress = Callable[[int, "int | None"], None]


def fetch_into(out: IO[bytes], url: str, max_bytes: int, progress: Progress | None = None) -> str:
    """The body at `url`, decoded, written into `out` (from its start); its SHA-1 in hex."""
    body = _Body(out, url, max_bytes, progress)
    _download_into(body)
    return body.digest.hexdigest()


def _download_into(body: _Body) -> None:
    """Attempt until the body is whole. A failed attempt that brought new bytes gives back the
    RETRIES (and starts the backoff over): a long download on a flaky line carries on as long as
    it moves; one that gets nowhere is given up on."""
    retries_left = RETRIES
    while True:
        held = body.received
        try:
            return _attempt(body)
        except _Retryable as e:
            if body.received > held:
                retries_left = RETRIES
            if retries_left == 0:
                raise DownloadError(f"{body.url}: {e}{_OFFLINE_HINT if e.offline else ''}") from None
            time.sleep(min(0.5 * 2 ** (RETRIES - retries_left), 4.0))
            retries_left -= 1


_OFFLINE_HINT = " (offline? train on a local file instead: lstmlm train --corpus PATH)"


class _Retryable(Exception):
    """A connection error, a 5xx answer or a body cut short: worth another attempt. `offline`:
    the server could not be reached at all, so the error's last word suggests a local file."""

    def __init__(self, reason: str, offline: bool = True) -> None:
        super().__init__(reason)
        self.offline = offline


def _attempt(body: _Body) -> None:
    """One request: from the start, or, when part of the body is held, for the rest of it."""
    import requests

    headers = body.resume_headers()
    try:
        response = requests.get(body.url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.Timeout:
        raise _Retryable("timed out") from None
    except requests.ConnectionError as e:
        raise _Retryable(f"cannot connect ({_root_cause(e)})") from None
    except requests.RequestException as e:
        raise DownloadError(f"{body.url}: {e}") from None
    with response:
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code} {response.reason}")
        if response.status_code == 206 and headers:
            body.resume(response)
        elif response.status_code == 416 and headers:
            body.nothing_past(response)  # whole already, or refused
            return
        elif response.status_code == 200:
            body.restart(response)
        else:
            raise DownloadError(f"{body.url}: HTTP {response.status_code} {response.reason}")
        body.stream(response)


class _Body:
    """The body as far as it has come, one across the attempts, in `out`. A part resumed with a
    Range request carries on its SHA-1, its count against max_bytes, the progress and the rate
    window as if it were one body; a whole answer (200) starts the file, digest and count over.

    Only a body sent as it is (no Content-Encoding) that came with a strong validator is resumed:
    If-Range makes the server send the whole new file (200) if it changed in between, so parts
    of two versions are never spliced; a gzip stream cannot be picked up mid-way, so it restarts."""

    def __init__(self, out: IO[bytes], url: str, max_bytes: int, progress: Progress | None) -> None:
        self.out, self.url, self.max_bytes, self.progress = out, url, max_bytes, progress
        self.digest = hashlib.sha1()
        self.received = 0  # decoded bytes in the file
        self.wire = 0  # bytes of the body on the wire so far (the same as `received` when not encoded)
        self.total: int | None = None  # the whole body's length on the wire, when announced
        self.validator: str | None = None  # what If-Range sends back; None: the body cannot be resumed
        self.decoder = _Decoder(url, "")
        self.window_start: float | None = None  # the rate is the server's: it runs on across attempts
        self.window_arrived = self.arrived = 0  # bytes that came over the wire, in all attempts

    def resume_headers(self) -> dict[str, str]:
        """A Range request for the rest, if the part held can be resumed; else none (from the start)."""
        if self.received == 0 or self.validator is None:
            return {}
        # identity: the validator and the byte offsets are those of the unencoded body we began
        return {"Range": f"bytes={self.received}-", "If-Range": self.validator, "Accept-Encoding": "identity"}

    def restart(self, response: requests.Response) -> None:
        """A whole body (the first answer, or a server that ignored the range or whose file changed)."""
        declared = response.headers.get("Content-Length")
        self.total = int(declared) if declared and declared.isdigit() else None  # bytes on the wire (compressed, if it is)
        self._check_announced(self.total)
        self.decoder = _Decoder(self.url, response.headers.get("Content-Encoding", ""))
        ranges = response.headers.get("Accept-Ranges", "").strip().lower() != "none"
        self.validator = _strong_validator(response.headers) if ranges and self.decoder.wbits is None else None
        self.out.seek(0)
        self.out.truncate()
        self.digest = hashlib.sha1()
        self.received = self.wire = 0

    def resume(self, response: requests.Response) -> None:
        """A 206 must be the rest of the body we hold the start of, unencoded. One that starts
        elsewhere or disagrees on the length is refused, not restarted: the server has just
        answered a question other than the one asked, so what else it says about the file
        (its validator, its length) cannot be trusted either; and a URL given without --sha1
        has nothing else to catch a wrong file."""
        content_range = response.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        encoded = response.headers.get("Content-Encoding", "").strip().lower() not in ("", "identity")
        whole = int(m[3]) if m and m[3] != "*" else None
        if m is None or int(m[1]) != self.received or encoded or (self.total is not None and whole is not None and whole != self.total):
            said = f"'{content_range}'" if content_range else "no Content-Range"
            encoding = f" encoded as '{response.headers['Content-Encoding']}'" if encoded else ""
            raise DownloadError(f"{self.url}: asked to resume at byte {self.received:,} of {self._of()}, the server answered {said}{encoding}: not resumed")
        if self.total is None and whole is not None:
            self._check_announced(whole)
            self.total = whole

    def nothing_past(self, response: requests.Response) -> None:
        """A 416: the server has no byte past those held. If its file is as long as what we hold,
        every byte had come (a chunked body whose last chunk was lost) and the body is whole.
        Otherwise, though If-Range said the file had not changed, it is not the file we began:
        refused, not fetched again (see `resume`)."""
        if response.headers.get("Content-Range", "").strip() == f"bytes */{self.received}" and self.total in (None, self.received):
            return
        raise DownloadError(f"{self.url}: asked to resume at byte {self.received:,}, the server answered HTTP 416 Range Not Satisfiable: not resumed")

    def stream(self, response: requests.Response) -> None:
        """Copy this answer's body into the file after what is held. A body that breaks off is
        _Retryable; one that is malformed or too large is a DownloadError.

        urllib3's read1 returns what has arrived (a server that drips is seen byte by byte, so its
        rate can be judged); the body is decoded here (`_Decoder`), at most a chunk at a time (a
        small compressed body cannot become gigabytes before the size check sees it)."""
        from urllib3.exceptions import HTTPError as TransportError
        from urllib3.exceptions import ReadTimeoutError

        raw = response.raw
        start = self.wire
        if self.window_start is None:
            self.window_start = time.monotonic()
        try:
            while wire_chunk := raw.read1(CHUNK_BYTES, decode_content=False):
                for chunk in self.decoder.decode(wire_chunk):
                    self._write(chunk)
                self.wire = start + raw.tell()
                self.arrived += len(wire_chunk)
                if self.progress is not None:
                    self.progress(self.wire, self.total)
                self._check_rate()
        except ReadTimeoutError:
            raise _Retryable(f"transfer cut short after {self.wire} bytes (timed out)", offline=False) from None
        except TransportError:  # the connection lost, or closed before the announced length
            raise _Retryable(f"transfer cut short after {self.wire} bytes (connection lost)", offline=False) from None
        if self.total is not None and self.wire != self.total:
            raise _Retryable(f"transfer cut short ({self.wire} of {self.total} bytes)", offline=False)
        if not self.decoder.ended:
            raise DownloadError(f"{self.url}: the compressed body is malformed (it ends before its compressed stream does)")

    def _write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise DownloadError(f"{self.url}: the body is larger than --max-bytes {self.max_bytes:,}")
        self.out.write(chunk)
        self.digest.update(chunk)

    def _check_rate(self) -> None:
        assert self.window_start is not None
        now = time.monotonic()
        if now - self.window_start >= RATE_WINDOW_S:
            came = self.arrived - self.window_arrived
            if came < MIN_RATE_BYTES_S * (now - self.window_start):
                raise DownloadError(
                    f"{self.url}: too slow ({came:,} bytes in {now - self.window_start:.0f} s, "
                    f"under {MIN_RATE_BYTES_S:,} bytes/s): given up after {self.wire:,} bytes"
                )
            self.window_start, self.window_arrived = now, self.arrived

    def _check_announced(self, total: int | None) -> None:
        if total is not None and total > self.max_bytes:
            raise DownloadError(f"{self.url}: the server announces {total:,} bytes, more than --max-bytes {self.max_bytes:,}")

    def _of(self) -> str:
        return f"{self.total:,}" if self.total is not None else "an unknown length"


def _strong_validator(headers: Mapping[str, str]) -> str | None:
    """What If-Range may send back (RFC 9110 13.1.5): the strong ETag, or the Last-Modified date
    when there is no ETag at all. A weak ETag names a version only loosely: no resume then."""
    etag = headers.get("ETag")
    if etag:
        return None if etag.strip().startswith("W/") else etag.strip()
    modified = headers.get("Last-Modified")
    return modified.strip() if modified else None


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib's for each coding


class _Decoder:
    """A body's Content-Encoding undone: none, gzip (one member or several) or deflate (zlib's
    format, RFC 9110), at most CHUNK_BYTES out at a time. Decoded here rather than by urllib3,
    which keeps a gzip stream cut short as if it were whole, and an encoding it does not know
    (br without brotli installed) as if it were the text."""

    def __init__(self, url: str, content_encoding: str) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")]
        if len(codings) > 1 or any(c not in _WBITS for c in codings):
            raise DownloadError(f"{url}: the body is encoded as '{content_encoding.strip()}' (Content-Encoding), which lstmlm cannot decode")
        self.url = url
        self.wbits = _WBITS[codings[0]] if codings else None
        self.inflater = zlib.decompressobj(self.wbits) if self.wbits is not None else None
        self.started = False  # a byte of the body has come (an empty body encodes nothing: it is whole)

    @property
    def ended(self) -> bool:
        """The compressed stream came to its end (or there is none)."""
        return self.inflater is None or self.inflater.eof or not self.started

    def decode(self, data: bytes) -> Iterator[bytes]:
        if self.inflater is None or self.wbits is None:
            yield data
            return
        self.started = True
        try:
            while True:
                chunk = self.inflater.decompress(data, CHUNK_BYTES)
                if chunk:
                    yield chunk
                data = self.inflater.unconsumed_tail
                if self.inflater.eof:
                    data = self.inflater.unused_data
                    if not data:
                        return
                    self.inflater = zlib.decompressobj(self.wbits)  # the next gzip member (after a deflate stream: an error)
                elif not data and len(chunk) < CHUNK_BYTES:
                    return  # all taken in, nothing held back
        except zlib.error as e:
            reason = re.sub(r"^Error -?\d+ while decompressing data: ", "", str(e))
            raise DownloadError(f"{self.url}: the compressed body is malformed ({reason})") from None


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error, e.g. 'Connection refused'."""
    text = str(e)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(Name or service not known|Connection refused)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return type(e).__name__
