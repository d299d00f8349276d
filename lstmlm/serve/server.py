"""A socket bound here and uvicorn serving the app on it.

The socket is bound and listening before uvicorn starts, so a port in use is one ServeError
line (uvicorn would log and exit), port 0 means a free port whose number is known before
serving, a client may connect as soon as the address is printed, and
whether the address is loopback is read from the address actually bound, not guessed from
the name given.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import uvicorn

from ..errors import ServeError
from . import Limits
from .app import create_app

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ServeError(f"cannot serve on {host}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(2048)  # connections wait in the queue from now on, before uvicorn has started
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class Server:
    def __init__(self, runs_dir: Path, host: str, port: int, limits: Limits, device: str = "cpu", precision: str = "fp32") -> None:
        self.runs_dir = Path(runs_dir)
        self.socket = bind(host, port)
        address, self.port = self.socket.getsockname()[:2]
        self.loopback = ipaddress.ip_address(address).is_loopback
        self.host = f"[{address}]" if ":" in address else address
        # on loopback, only requests that name loopback: a page whose name rebinds to 127.0.0.1 gets no answer
        self.app = create_app(self.runs_dir, limits, device, precision, allowed_hosts=LOOPBACK_NAMES if self.loopback else None)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM; open streams get a few seconds to finish."""
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3)
        try:
            uvicorn.Server(config).run(sockets=[self.socket])
        finally:
            self.socket.close()
