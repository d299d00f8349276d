"""A loopback HTTP server that misbehaves on request: `plan()` queues, for the next requests,
an error, a stall, a body cut short, gzip (good, bad, a bomb), a drip or an endless stream; past
them it serves its directory's files. conftest.py's `http_server` and `start_server` start them."""

from __future__ import annotations

import collections
import functools
import gzip
import http.server
import threading
import urllib.parse
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
BEHAVIOURS = (SERVE, NOT_FOUND, SERVER_ERROR, STALL, STALL_BODY, CUT, GZIP, BAD_GZIP, GZIP_BOMB, GZIP_CUT, BROTLI, DRIP, ENDLESS)
GZIP_BOMB_BYTES = 16 << 20
DRIP_S = 0.05
ENDLESS_BYTES = 16 << 20


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
        self.planned: collections.deque[str] = collections.deque()
        self.requests: list[str] = []  # paths asked for, in order
        self.released = threading.Event()  # ends every stall
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def plan(self, *behaviours: str) -> None:
        """The next requests behave so, in order; once they are used up, files are served."""
        unknown = set(behaviours) - set(BEHAVIOURS)
        assert not unknown, f"unknown behaviours {unknown}"
        if GZIP_BOMB in behaviours:
            gzip_bomb()  # now, not while the client waits for the answer
        self.planned.extend(behaviours)

    def next_behaviour(self) -> str:
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
        elif behaviour == SERVE:
            self._send(body, len(body))
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

    def _file_body(self) -> bytes | None:
        path = self.server.root / urllib.parse.unquote(self.path.lstrip("/").split("?")[0])
        return path.read_bytes() if path.is_file() else None

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
