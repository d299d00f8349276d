"""What a request must pass before any route: its Host names this server (DNS rebinding), and
its body fits the limit (refused from its Content-Length, or once that many bytes are read —
never read whole)."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from . import Limits
from .catalog import shown


def one_line(message: str) -> str:
    return " ".join(message.split())


class HostCheck:
    """Answer only requests whose Host header (any port) is an IP address or one of `allowed`:
    a page whose own name was rebound to this server's address (DNS rebinding) still names
    itself in Host, and is refused; an address cannot be rebound, so it is always answered."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app, self.allowed = app, {name.lower().rstrip(".") for name in allowed if not is_address(name)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            name = host_name(host)
            if name not in self.allowed and not is_address(name):
                names = ", ".join(sorted(self.allowed))
                message = f"this server answers requests for {names} or an IP address only, not for Host {shown(host)}"
                message += " (lstmlm serve --allowed-host adds a name)"
                await JSONResponse({"error": one_line(message)}, 400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a Host header: without its port, in lower case, without a final dot."""
    name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
    return name.lower().rstrip(".")


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


class BodyLimit:
    """Refuse (413) a request body over `limits.max_body` bytes: at once from its Content-Length
    (the server then reads no more of it than that says), or, for a chunked body, as soon as
    more than that has been read — a body is never read whole before it is known to fit."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if "transfer-encoding" in headers:  # chunked: its size is known once it is read (a Content-Length beside it is ignored, RFC 9112 6.3)
            body = await self.read(receive)
            if body is None:
                await self.refuse("the request body", scope, receive, send)
                return
            receive = replay(body, receive)
        elif length is not None and int(length) > self.limits.max_body:  # a number: h11 refuses anything else
            await self.refuse(f"the request body ({int(length):,} bytes)", scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def read(self, receive: Receive) -> dict[str, Any] | None:
        """The body as one message (or the disconnect that cut it short); None once it is over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return dict(message)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.limits
        message = f"{what} is over this server's limit of {limits.max_body:,} bytes (what a text of {limits.max_text:,} characters may take as JSON)"
        await JSONResponse({"error": message}, 413, headers={"Connection": "close"})(scope, receive, send)


def replay(first: dict[str, Any], receive: Receive) -> Receive:
    """`receive` that gives `first` once, then what `receive` gives."""
    pending = [first]

    async def again() -> Any:
        return pending.pop() if pending else await receive()

    return again
