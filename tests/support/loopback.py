"""A loopback HTTP server that misbehaves on request: `plan()` queues, for the next requests,
an error, a stall, a body cut short (`CUT`, or a `Cut` at a byte of the file), gzip (good, bad,
a bomb), a drip, an endless stream, or a wrong answer to a Range request; past them it serves its
directory's files. Like a real server it sends a validator (a strong ETag by default) and honours
`Range: bytes=N-` with 206 unless `If-Range` names another version of the file; `ranges`,
`validator` and `chunked` make it behave otherwise. conftest.py's `http_server` and
`start_server` start them."""

from __future__ import annotations

import collections
import email.utils
import functools
import gzip
import hashlib
import http.server
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

SERVE = "serve"  # the file, whole
NOT_FOUND = "404"
SERVER_ERROR = "500"
STALL = "stall"  # accept the request, then say nothing until the test ends
STALL_BODY = "stall-body"  # send the headers and half the body, then say nothing
CUT = "cut"  # promise the whole length, send half the body, close the connection
GZIP = "gzip"  # the file gzipped on the wire (Content-Length: the compressed size), as CDNs do
BAD_GZIP = "bad-gzip"  # "gzip" that is not: a header, then bytes no inflater accepts
GZIP_BOMB = "gzip-bomb"  # a few KiB on the wire that inflate to GZIP_BOMB_BYTES of zeros (made once, when planned)
GZIP_CUT = "gzip-cut"  # the file gzipped, its stream's last 100 bytes left off (Content-Length: what is sent)
BROTLI = "br"  # "Content-Encoding: br", a coding lstmlm cannot decode (the bytes are the file's, unencoded)
DRIP = "drip"  # the file with its length, one byte every DRIP_S
ENDLESS = "endless"  # no length; the file over and over, ENDLESS_BYTES in all (past any cap a test sets)
WRONG_RANGE = "wrong-range"  # a Range request answered 206 with the rest from half the offset asked for
UNSATISFIABLE = "416"  # a Range request answered 416 Range Not Satisfiable
BEHAVIOURS = (SERVE, NOT_FOUND, SERVER_ERROR, STALL, STALL_BODY, CUT, GZIP, BAD_GZIP, GZIP_BOMB, GZIP_CUT, BROTLI, DRIP, ENDLESS, WRONG_RANGE, UNSATISFIABLE)
GZIP_BOMB_BYTES = 16 << 20
DRIP_S = 0.05
ENDLESS_BYTES = 16 << 20


@dataclass(frozen=True)
class Cut:
    """Answer as SERVE does (a Range honoured), but close the connection once byte `at` of the
    file has been sent (chunked: without the last chunk): a part that starts there sends none. `gzip`: the file gzipped on the
    wire instead (no Range honoured), cut at byte `at` of that. `then`: the file's new content
    once the connection is closed (it changes between two attempts)."""

    at: int
    gzip: bool = False
    then: bytes | None = None


def etag_of(body: bytes) -> str:
    """The strong ETag the server sends for a file."""
    return f'"{hashlib.sha1(body).hexdigest()[:16]}"'


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    return gzip.compress(bytes(GZIP_BOMB_BYTES), compresslevel=9)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """Serves files from `root` on 127.0.0.1; `plan()` queues misbehaviour for the next requests."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.planned: collections.deque[str | Cut] = collections.deque()
        self.requests: list[str] = []  # paths asked for, in order
        self.asked: list[tuple[str | None, str | None]] = []  # each request's Range and If-Range headers
        self.ranges = True  # honour Range requests; False: say nothing of ranges, answer 200 and the whole file, as many servers do
        self.validator = "etag"  # the file's version as the server tells it: "etag", "weak-etag", "last-modified" or "none"
        self.chunked = False  # announce no length: a chunked body, and a range's total as '*'
        self.released = threading.Event()  # ends every stall
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def plan(self, *behaviours: str | Cut) -> None:
        """The next requests behave so, in order; once they are used up, files are served."""
        unknown = {b for b in behaviours if not isinstance(b, Cut)} - set(BEHAVIOURS)
        assert not unknown, f"unknown behaviours {unknown}"
        if GZIP_BOMB in behaviours:
            gzip_bomb()  # now, not while the client waits for the answer
        self.planned.extend(behaviours)

    def next_behaviour(self) -> str | Cut:
        return self.planned.popleft() if self.planned else SERVE

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Release stalled handlers and close the socket: later connections are refused."""
        self.released.set()
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        self.server.asked.append((self.headers.get("Range"), self.headers.get("If-Range")))
        behaviour = self.server.next_behaviour()
        if behaviour == STALL:
            self.server.released.wait()
            return
        if behaviour in (NOT_FOUND, SERVER_ERROR):
            self.send_error(int(behaviour))
            return
        body = self._file_body()
        if body is None:
            self.send_error(404)
        elif behaviour in (SERVE, WRONG_RANGE, UNSATISFIABLE) or (isinstance(behaviour, Cut) and not behaviour.gzip):
            self._send_file(body, behaviour)
        elif isinstance(behaviour, Cut):
            wire = gzip.compress(body)
            self._send(wire[: behaviour.at], len(wire), encoding="gzip")
            self._cut(behaviour)
        elif behaviour in (GZIP, BAD_GZIP, GZIP_BOMB, GZIP_CUT):
            wire = {
                GZIP: lambda: gzip.compress(body),
                BAD_GZIP: lambda: b"\x1f\x8b\x08\x00" + b"not deflate data" * 64,
                GZIP_BOMB: gzip_bomb,
                GZIP_CUT: lambda: gzip.compress(body)[:-100],
            }[behaviour]()
            self._send(wire, len(wire), encoding="gzip")
        elif behaviour == BROTLI:
            self._send(body, len(body), encoding="br")
        elif behaviour == DRIP:
            self._send(b"", len(body))
            for i in range(len(body)):
                if self.server.released.wait(DRIP_S):  # the test is over
                    break
                self._write(body[i : i + 1])
            self.close_connection = True
        elif behaviour == ENDLESS:
            self._send(b"", None)
            for _ in range(ENDLESS_BYTES // len(body)):
                if self.server.released.is_set() or not self._write(body):
                    break
            self.close_connection = True
        else:
            self._send(body[: len(body) // 2], len(body))
            if behaviour == STALL_BODY:
                self.server.released.wait()
            self.close_connection = True

    def _file(self) -> Path:
        return self.server.root / urllib.parse.unquote(self.path.lstrip("/").split("?")[0])

    def _file_body(self) -> bytes | None:
        path = self._file()
        return path.read_bytes() if path.is_file() else None

    def _version(self, body: bytes) -> dict[str, str]:
        """The validator headers the file is served with."""
        etag = etag_of(body)
        return {
            "etag": {"ETag": etag},
            "weak-etag": {"ETag": f"W/{etag}"},
            "last-modified": {"Last-Modified": email.utils.formatdate(self._file().stat().st_mtime, usegmt=True)},
            "none": {},
        }[self.server.validator]

    def _send_file(self, body: bytes, behaviour: str | Cut) -> None:
        """The file, or the rest of it from the Range asked for (206) when the If-Range (if any)
        names this version; a Cut closes the connection at its byte."""
        version = self._version(body)
        start = self._range_start(version)
        if start is not None and (behaviour == UNSATISFIABLE or start >= len(body)):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start is not None and behaviour == WRONG_RANGE:
            start //= 2
        total = "*" if self.server.chunked else str(len(body))
        part = body[start or 0 :]
        sent = part if not isinstance(behaviour, Cut) else part[: max(0, behaviour.at - (start or 0))]
        self.send_response(200 if start is None else 206)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        for name, value in version.items():
            self.send_header(name, value)
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{total}")
        self.send_header(*(("Transfer-Encoding", "chunked") if self.server.chunked else ("Content-Length", str(len(part)))))
        self.end_headers()
        if not self.server.chunked:
            self._write(sent)
        elif self._write(f"{len(sent):x}\r\n".encode() + sent + b"\r\n" if sent else b"") and not isinstance(behaviour, Cut):
            self._write(b"0\r\n\r\n")  # the last chunk: a cut body never sends it, even when every byte is sent
        if isinstance(behaviour, Cut):
            self._cut(behaviour)

    def _range_start(self, version: dict[str, str]) -> int | None:
        """Where a `Range: bytes=N-` request asks to start, if it is to be honoured."""
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if m is None or not self.server.ranges or (if_range is not None and if_range not in version.values()):
            return None
        return int(m[1])

    def _cut(self, cut: Cut) -> None:
        self.close_connection = True
        if cut.then is not None:
            self._file().write_bytes(cut.then)

    def _send(self, body: bytes, length: int | None, encoding: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if encoding is not None:
            self.send_header("Content-Encoding", encoding)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self._write(body)

    def _write(self, data: bytes) -> bool:
        """Send `data`; False once the client has gone."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        return True

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass
