"""What one connection may hold, so that slow clients, or many, cannot take the server down.

uvicorn bounds a request's line and headers in bytes (h11's 16 KiB) and closes a connection
left idle between requests (`timeout_keep_alive`, 5 s), and those settings stay as they are.
But it has no deadline for a request still arriving — the keep-alive timer is cancelled by any
byte, so a header line every few seconds holds a connection for ever — and its
`limit_concurrency` answers 503 only to a request it has read whole: connections that never
finish their headers each keep a descriptor until the process has none left, and then every
accept fails and logs a traceback. So, on uvicorn's own h11 protocol (`Guarded`):

- one connection more than `Limits.max_connections` is answered 503 and closed at once;
- a request's line and headers must arrive within `header_timeout_s` of the connection's
  start (or of the last response's end), its body within `body_timeout_s` of its headers, or
  the connection is answered 408 and closed; a response, however long it streams, has none;

and for the process: its soft limit on descriptors raised to its hard limit
(`raise_descriptor_limit`), and a log of one line per kind of failure, at most one a minute
with a count of those left out (`OncePerKind`), never a traceback per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import Limits

LOG_EVERY_S = 60.0  # one line per kind of failure at most this often
# The listen queue, and as many connections as asyncio accepts at one wakeup (uvicorn's
# `backlog`): each holds a descriptor until the loop runs again, even one refused at once.
ACCEPT_BATCH = 128
# descriptors a server keeps besides its connections: the listening socket, the event loop's,
# its libraries', a checkpoint being read, the worker threads'
OTHER_DESCRIPTORS = 64


class Guarded(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and header and body deadlines (`guarded`
    makes one for a server's limits)."""

    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.awaiting = "headers"  # what the deadline is for: "headers" or "body"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        most = self.limits.max_connections
        if len(self.connections) > most:
            self.logger.warning("refused connections: %d were open, as many as this server keeps (--max-connections)", most)
            self.refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {most} connections are open, as many as this server keeps; try again shortly")
            return
        self.expect("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.expect("headers")  # the next request's; uvicorn's keep-alive timer closes an idle connection before
            self.follow()  # a pipelined request may have arrived already

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)
        # Python 3.11's selector transport keeps a bound method of itself after it closes: a
        # reference cycle, so each connection's transport, socket and buffers waited for the
        # cyclic collector, which the server runs seldom (server.COLLECT_EVERY), and the
        # server's memory grew with them. Python 3.12 lets go of it on close (CPython
        # gh-100348); this does the same on 3.11.
        if getattr(self.transport, "_read_ready_cb", None) is not None:
            self.transport._read_ready_cb = None  # type: ignore[attr-defined]
        # A connection lost with an error keeps uvicorn's keep-alive timer, which holds the
        # protocol (another cycle, each with its request's objects) and would fire for nothing.
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def follow(self) -> None:
        """The deadline for what the request still has to send, from h11's view of the client."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self.awaiting == "headers":
            self.expect("body")
        elif state not in (h11.IDLE, h11.SEND_BODY):  # the request has arrived (or the connection is done)
            self.disarm()

    def expect(self, what: str) -> None:
        self.disarm()
        self.awaiting = what
        seconds = self.limits.header_timeout_s if what == "headers" else self.limits.body_timeout_s
        self.deadline = self.loop.call_later(seconds, self.expired, what, seconds)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def expired(self, what: str, seconds: float) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if what == "headers":  # two messages, two kinds of failure in the log
            self.logger.warning("closed connections whose request headers did not arrive within %g s (--header-timeout)", seconds)
        else:
            self.logger.warning("closed connections whose request body did not arrive within %g s of its headers (--body-timeout)", seconds)
        self.refuse(http.HTTPStatus.REQUEST_TIMEOUT, f"the request's {what} did not arrive within {seconds:g} seconds")

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot read (malformed, or headers over its 16 KiB) is answered in JSON too."""
        self.refuse(http.HTTPStatus.BAD_REQUEST, "not an HTTP request this server can read: malformed, or its headers over 16 KiB")

    def refuse(self, status: http.HTTPStatus, message: str) -> None:
        """Answer `status` with a one-line JSON error, unless a response is on its way, and close:
        nothing more is read from this connection (an app waiting for its body hears it is gone)."""
        cycle = self.cycle  # the last request's, or the one arriving now
        if cycle is None or not cycle.response_started or cycle.response_complete:
            body = json.dumps({"error": message}).encode()
            head = f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            retry = "retry-after: 1\r\n" if status is http.HTTPStatus.SERVICE_UNAVAILABLE else ""
            self.transport.write((head + retry + "connection: close\r\n\r\n").encode() + body)
        self.transport.close()


def guarded(limits: Limits) -> type[Guarded]:
    """The protocol class for a server with these limits (uvicorn makes one per connection)."""
    return type("Guarded", (Guarded,), {"limits": limits})


def descriptors_needed(limits: Limits) -> int:
    """The most descriptors a server with these limits holds at once."""
    return limits.max_connections + ACCEPT_BATCH + OTHER_DESCRIPTORS


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (no privilege
    needed: a server with many clients needs many), and return the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):  # a hard limit of "unlimited" cannot be the soft one everywhere
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class OncePerKind(logging.Filter):
    """Let through one record of each kind (its logger, its message's first line, its
    exception's type) every `every_s` seconds, as one line: the exception's type and message
    in place of its traceback, and how many like it were left out since the last one."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.last: dict[tuple[str, str, str], float] = {}
        self.left_out: Counter[tuple[str, str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        kind = (record.name, str(record.msg).split("\n")[0], type(error).__name__ if error else "")
        now, last = self.clock(), self.last.get(kind)
        if last is not None and now - last < self.every_s:
            self.left_out[kind] += 1
            return False
        self.last[kind] = now
        line = " ".join(record.getMessage().split())
        if error is not None:
            line += f": {type(error).__name__}: {' '.join(str(error).split())}"
        left_out = self.left_out.pop(kind, 0)
        if left_out and last is not None:
            line += f" (and {left_out} more like it in the {now - last:.0f} s before)"
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = line, (), None, None, None
        return True


@contextlib.contextmanager
def one_line_per_kind(*loggers: str) -> Iterator[None]:
    """`OncePerKind` on these loggers while the block runs."""
    once = OncePerKind()
    for name in loggers:
        logging.getLogger(name).addFilter(once)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(once)
