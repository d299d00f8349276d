"""Who may use a server beyond this machine: a token every request carries, and HTTPS.

A server with a token answers only requests that carry it: `Authorization: Bearer TOKEN` from a
program, or a cookie from a browser. The page cannot set a header on its requests (EventSource,
which streams a generation, cannot at all), so a browser opens the page once as `/?token=TOKEN`:
the server answers with the cookie and sends it on to the same address without the token, so
the token leaves the address bar and the history. The cookie is HttpOnly (no script reads it),
SameSite=Strict (another site's page cannot make the browser send it, so it cannot act as the
user) and, over HTTPS, Secure; its name holds the port, so two servers on one machine keep a
cookie each. Tokens are compared in constant time.

Over plain HTTP the token crosses the network in clear; `certfile` and `keyfile` serve HTTPS.
"""

from __future__ import annotations

import hmac
import re
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import Receive, Scope, Send

from ..errors import ServeError

MIN_TOKEN = 16  # characters: a token short enough to guess guards nothing
TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]+")  # what a URL, a header and a cookie all carry as they are
MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe())' makes one"


@dataclass(frozen=True)
class Access:
    """A server's token (None: every request is answered) and its certificate and key (None:
    plain HTTP). Checked when made: a token too short or with characters a URL would change,
    a certificate or key that cannot be read or that do not belong together."""

    token: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None and (len(self.token) < MIN_TOKEN or not TOKEN_CHARACTERS.fullmatch(self.token)):
            raise ServeError(f"--token must be at least {MIN_TOKEN} characters of A-Z a-z 0-9 - . _ ~ ({MAKE_ONE})")
        if (self.certfile is None) != (self.keyfile is None):
            raise ServeError("--certfile and --keyfile go together: HTTPS needs the certificate and its private key")
        if self.certfile is not None and self.keyfile is not None:
            tls_context(self.certfile, self.keyfile)

    @property
    def tls(self) -> bool:
        return self.certfile is not None


def tls_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A server's TLS context from PEM files; ServeError, one line, when they cannot serve. A key
    protected by a passphrase is refused rather than asked for (a server has no one to ask)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _Encrypted:
        raise ServeError(f"the key {keyfile} is protected by a passphrase: give it without one (openssl pkey -in KEY -out PLAIN)") from None
    except OSError as e:  # ssl.SSLError is one: a file that is not PEM, a key that is not the certificate's
        reason = e.strerror or getattr(e, "reason", None) or str(e)
        raise ServeError(f"cannot serve HTTPS with {certfile} and {keyfile}: {reason}") from None
    return context


class _Encrypted(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


class TokenCheck:
    """Answer only requests that carry `token`, as a bearer header or as the cookie; give the
    cookie to a GET or HEAD that names the token in its query (then send it on without it)."""

    def __init__(self, app: Any, token: str, secure: bool) -> None:
        self.app, self.token, self.secure = app, token.encode(), secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [value for key, value in query if key == "token"]
        cookie = f"lstmlm-token-{(scope.get('server') or ('', 0))[1]}"
        if given and scope["method"] in ("GET", "HEAD"):
            response = self.welcome(scope, query, cookie) if self.matches(given[-1]) else refused("the token in the address is not this server's")
        elif self.matches(bearer(headers)) or self.matches(cookie_parser(headers.get("cookie", "")).get(cookie)):
            await self.app(scope, receive, send)
            return
        else:
            response = refused("this server needs its token: send 'Authorization: Bearer TOKEN', or open its page once as /?token=TOKEN")
        await response(scope, receive, send)

    def matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token)

    def welcome(self, scope: Scope, query: list[tuple[str, str]], cookie: str) -> RedirectResponse:
        """The cookie, and the same address without the token."""
        rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "token"])
        response = RedirectResponse(urllib.parse.quote(scope["path"]) + (f"?{rest}" if rest else ""), status_code=303)
        response.set_cookie(cookie, self.token.decode(), httponly=True, samesite="strict", secure=self.secure, path="/")
        return response


def bearer(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, RFC 9110)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def refused(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, 401, headers={"WWW-Authenticate": 'Bearer realm="lstmlm"'})
