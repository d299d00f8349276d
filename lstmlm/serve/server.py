"""A socket bound here and uvicorn serving the app on it.

The socket is bound and listening before uvicorn starts, so a port in use is one ServeError
line (uvicorn would log and exit), port 0 means a free port whose number is known before
serving, a client may connect as soon as the address is printed, and whether the address is
loopback is read from the address actually bound, not guessed from the name given.

With `Access`, every request must carry the server's token, and the socket speaks TLS.
Whatever the address, the app answers only requests whose Host is an IP address or a name of
this server's — loopback's, this machine's, the one `--host` gave, and each `--allowed-host` —
so a page whose own name was rebound to this address gets no answer (DNS rebinding). uvicorn
runs `connections.Guarded`, its h11 protocol with a connection cap and header and body
deadlines, with the descriptor limit raised to fit, and its log one line per kind of failure.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn

from ..device import threads_within_limit
from ..errors import ServeError
from . import Limits
from .access import Access
from .app import create_app
from .connections import ACCEPT_BATCH, descriptors_needed, guarded, one_line_per_kind, raise_descriptor_limit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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

    @property
    def url(self) -> str:
        return f"{'https' if self.access.tls else 'http'}://{self.host}:{self.port}/"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM; open streams get a few seconds to finish."""
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
        try:
            with one_line_per_kind("uvicorn.error", "asyncio"):
                uvicorn.Server(config).run(sockets=[self.socket])
        finally:
            self.socket.close()
