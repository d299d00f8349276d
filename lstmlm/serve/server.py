"""A socket bound here and uvicorn serving the app on it.

The socket is bound and listening before uvicorn starts, so a port in use is one ServeError
line (uvicorn would log and exit), port 0 means a free port whose number is known before
serving, a client may connect as soon as the address is printed, and whether the address is
loopback is read from the address actually bound, not guessed from the name given.

From `stoppable` on, Ctrl-C and SIGTERM stop the server whenever they come, and `run` says
which did: recorded, never raised, before uvicorn takes them over and after it gives them back.

With `Access`, every request must carry the server's token, and the socket speaks TLS.
Whatever the address, the app answers only requests whose Host is an IP address or a name of
this server's — loopback's, this machine's, the one `--host` gave, and each `--allowed-host` —
so a page whose own name was rebound to this address gets no answer (DNS rebinding). uvicorn
runs `connections.Guarded`, its h11 protocol with a connection cap and header and body
deadlines, with the descriptor limit raised to fit, and its log one line per kind of failure.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import signal
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from ..device import threads_within_limit
from ..errors import ServeError
from . import Limits
from .access import Access
from .app import create_app
from .connections import ACCEPT_BATCH, descriptors_needed, guarded, one_line_per_kind, raise_descriptor_limit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


COLLECT_EVERY = 100_000  # allocations between the cyclic collector's youngest collections (Python's default: 700)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ServeError(f"cannot serve on {host}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(ACCEPT_BATCH)  # connections wait in the queue from now on, before uvicorn has started
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def host_names(host: str, allowed: Sequence[str]) -> list[str]:
    """The names a server answers for, besides any IP address: loopback's, this machine's,
    the one it was asked to serve on, and `allowed`."""
    return sorted({*LOOPBACK_NAMES, socket.gethostname(), host, *allowed} - {""})


class Server:
    def __init__(
        self,
        runs_dir: Path,
        host: str,
        port: int,
        limits: Limits,
        device: str = "cpu",
        precision: str = "fp32",
        allowed_hosts: Sequence[str] = (),
        access: Access = Access(),
    ) -> None:
        self.runs_dir, self.limits, self.access = Path(runs_dir), limits, access
        descriptors, needed = raise_descriptor_limit(), descriptors_needed(limits)
        if descriptors < needed:
            raise ServeError(
                f"--max-connections {limits.max_connections} needs about {needed} open files, and this process may open {descriptors} (ulimit -n): "
                "lower --max-connections"
            )
        self.socket = bind(host, port)
        address, self.port = self.socket.getsockname()[:2]
        self.loopback = ipaddress.ip_address(address).is_loopback
        self.host = f"[{address}]" if ":" in address else address
        self.app = create_app(self.runs_dir, limits, device, precision, allowed_hosts=host_names(host, allowed_hosts), access=access)
        self.stopped_by: list[int] = []  # the signals that came since `stoppable`
        self._uvicorn: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.access.tls else 'http'}://{self.host}:{self.port}/"

    @contextlib.contextmanager
    def stoppable(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the server while the block runs, whenever they come: each is
        recorded in `stopped_by`, never raised, and `run` serves not at all after one. uvicorn
        takes both over only once it runs. Before, Ctrl-C was raised where the process stood: in
        asyncio's runner, the line `stopped` was followed by a RuntimeWarning (a coroutine never
        awaited). And a Ctrl-C the process inherited ignored (a server started in the background
        by a script) still stopped uvicorn, which raised it again on its way out, ignored: the
        command ended without a word."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            self.stopped_by.append(signum)
            if self._uvicorn is not None:  # between its own handlers' turn and ours: it stops
                self._uvicorn.should_exit = True

        try:
            previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
        except ValueError:  # not the main thread: signals are the main thread's (and uvicorn's) to take
            yield
            return
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self) -> int | None:
        """Serve until Ctrl-C or SIGTERM (under `stoppable`); open streams get a few seconds to
        finish. The signal that stopped it: SIGTERM if one came, else SIGINT (None: none came)."""
        # Steps run in the batches' threads. From a thread other than the main one, an OpenMP
        # region of 2 cores woke its sleeping worker each time (libgomp throttles its spinning
        # once more threads than cores are in its pools): a batch-1 step took 150 µs instead of
        # 50 on one core (the d2l model, a 2-core AMD EPYC). One core a step by default.
        torch.set_num_threads(threads_within_limit(self.limits.threads))
        # Each character a stream sent was a few small objects for a while (a list between the
        # batch and the stream, a step's list in its Continuation), and the cyclic collector,
        # run every 700 of them, went through every stream's text held so far each time: 80%
        # of the event loop's time on a character (1,373 ns against 276 with it off, one
        # stream's 200,000 characters taken 70 at a time). It runs every COLLECT_EVERY instead,
        # and what exists before serving (torch, the app, the models) is out of its sight. A
        # step is now a tuple shared by every stream (`generate.alone`) and a closed connection
        # leaves no cycle (`connections.Guarded.connection_lost`), so there is little for it
        # to find: the memory stays flat under a steady load.
        gc.freeze()
        gc.set_threshold(COLLECT_EVERY)
        config = uvicorn.Config(
            self.app,
            http=guarded(self.limits),
            backlog=ACCEPT_BATCH,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=3,
            ssl_certfile=self.access.certfile,  # already read once (access.tls_context): they serve
            ssl_keyfile=self.access.keyfile,
        )
        server = self._uvicorn = uvicorn.Server(config)
        if self.stopped_by:  # stopped already: uvicorn starts, and stops at once
            server.should_exit = True
        try:
            with one_line_per_kind("uvicorn.error", "asyncio"):
                server.run(sockets=[self.socket])  # it raises the signals it took again on its way out: `stoppable` records them
        finally:
            self._uvicorn = None
            self.socket.close()
        return signal.SIGTERM if signal.SIGTERM in self.stopped_by else signal.SIGINT if self.stopped_by else None
