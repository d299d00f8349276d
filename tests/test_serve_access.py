"""`lstmlm serve --token` and `--certfile/--keyfile`: a server other machines can reach that
answers only those who hold its token, over HTTPS.

Every request without the token is a 401 (the page, the API, its static files); a program sends
`Authorization: Bearer TOKEN`; a browser opens the page once as `/?token=TOKEN` and gets an
HttpOnly, SameSite=Strict cookie (Secure over HTTPS) and the address without the token. Tokens
too short or that a URL would change are refused, as are certificates and keys that cannot
serve (a key behind a passphrase too, rather than asked for). In process with FastAPI's test
client; then real processes, over real TLS (a certificate made by openssl) and in a real browser."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")

from fastapi.testclient import TestClient

from lstmlm.errors import ServeError
from lstmlm.serve import Limits
from lstmlm.serve.access import Access
from lstmlm.serve.app import create_app

from support.browser import chromium
from support.cli import assert_one_error_line, cli
from support.serving import ServeProcess, sse_events

TOKEN = "s3cret-Token_of.twenty~"
GENERATE = {"run": "raw", "prefix": "the", "length": 40, "seed": 3}
NEEDS = "this server needs its token: send 'Authorization: Bearer TOKEN', or open its page once as /?token=TOKEN"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (openssl, or a skip)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here to make a certificate")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def guarded(tiny_runs: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_runs, Limits(), access=Access(TOKEN))) as c:
        yield c


def assert_refused(response: Any, message: str = NEEDS) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"error": message}
    assert response.headers["www-authenticate"] == 'Bearer realm="lstmlm"'
    assert "set-cookie" not in response.headers


def test_without_the_token_nothing_is_answered(guarded: TestClient) -> None:
    for path in ("/", "/api/runs", "/api/status", "/api/runs/raw/metrics", "/static/app.js", "/api/docs", "/no-such-page"):
        assert_refused(guarded.get(path))
    assert_refused(guarded.post("/api/generate", json=GENERATE))
    assert_refused(guarded.post("/api/generate?token=" + TOKEN, json=GENERATE))  # the address gives a cookie to a GET only
    assert_refused(guarded.post("/api/inspect", content=b"x" * (Limits().max_body + 1)))  # refused before the body is judged
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer"):
        assert_refused(guarded.get("/api/runs", headers={"Authorization": header}))
    assert_refused(guarded.get("/api/runs", headers={"Cookie": f"lstmlm-token-8000={TOKEN}"}))  # another port's server's cookie


def test_a_program_sends_the_token_as_a_bearer(guarded: TestClient) -> None:
    for scheme in ("Bearer", "bearer"):
        response = guarded.get("/api/runs", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200 and {"raw", "d2l"} <= {run["name"] for run in response.json()["runs"]}
    response = guarded.post("/api/generate", json={**GENERATE, "stream": False}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["text"]


def test_a_browser_opens_the_page_once_with_the_token_and_keeps_a_cookie(guarded: TestClient) -> None:
    response = guarded.get(f"/?token={TOKEN}&run=raw", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/?run=raw"  # the token leaves the address
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"lstmlm-token-80={TOKEN};")  # the test client's port
    assert {"HttpOnly", "Path=/", "SameSite=strict"} <= {part.strip() for part in cookie.split(";")} and "Secure" not in cookie
    assert guarded.get("/").status_code == 200  # the cookie is held now
    assert guarded.get("/api/runs").status_code == 200
    events = sse_events(guarded.post("/api/generate", json=GENERATE).text)
    assert events[0][0] == "start" and events[-1][0] == "done"


def test_a_wrong_token_in_the_address_gets_no_cookie(guarded: TestClient) -> None:
    assert_refused(guarded.get("/?token=not-the-token-at-all", follow_redirects=False), "the token in the address is not this server's")
    assert_refused(guarded.get("/api/runs"))


def test_over_https_the_cookie_is_secure(tiny_runs: Path, tls: tuple[Path, Path]) -> None:
    with TestClient(create_app(tiny_runs, Limits(), access=Access(TOKEN, *tls))) as c:
        cookie = c.get(f"/?token={TOKEN}", follow_redirects=False).headers["set-cookie"]
    assert "Secure" in {part.strip() for part in cookie.split(";")}


@pytest.mark.parametrize(
    "token",
    ["short-token", "a" * 15, "with a space in it ok", "plus+signs+change+in+urls", "sláinte-and-more-letters", "semi;colon;in;a;cookie;"],
)
def test_a_token_that_guards_nothing_or_that_a_url_changes_is_refused(token: str) -> None:
    with pytest.raises(ServeError, match=re.escape("--token must be at least 16 characters of A-Z a-z 0-9 - . _ ~")):
        Access(token)


def test_certificates_and_keys_that_cannot_serve_are_refused(tmp_path: Path, tls: tuple[Path, Path]) -> None:
    cert, key = tls
    with pytest.raises(ServeError, match="--certfile and --keyfile go together"):
        Access(certfile=cert)
    with pytest.raises(ServeError, match=re.escape(f"cannot serve HTTPS with {tmp_path / 'none.pem'} and {key}: No such file or directory")):
        Access(certfile=tmp_path / "none.pem", keyfile=key)
    (tmp_path / "text.pem").write_text("not a certificate\n")
    with pytest.raises(ServeError, match="cannot serve HTTPS with"):
        Access(certfile=tmp_path / "text.pem", keyfile=key)
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", other], check=True, capture_output=True)
    with pytest.raises(ServeError, match=r"cannot serve HTTPS with .*KEY_VALUES_MISMATCH"):
        Access(certfile=cert, keyfile=other)  # a key that is not the certificate's
    locked = tmp_path / "locked.pem"
    subprocess.run(["openssl", "pkey", "-in", key, "-out", locked, "-aes256", "-passout", "pass:secret"], check=True, capture_output=True)
    with pytest.raises(ServeError, match="is protected by a passphrase"):  # refused, never asked for on a terminal
        Access(certfile=cert, keyfile=locked)


def test_the_command_refuses_a_bad_token_or_certificate_in_one_line(tiny_runs: Path, tmp_path: Path) -> None:
    assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--port", "0", "--token", "guessable"), "--token must be at least 16 characters")
    assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--port", "0", "--keyfile", tmp_path / "key.pem"), "--certfile and --keyfile go together")


def request(server: ServeProcess, method: str, path: str, context: ssl.SSLContext, body: dict | None = None, token: str | None = None) -> tuple[int, str]:
    """(status, body text) of one request over TLS to the server."""
    host, port = server.address
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_a_real_server_over_https_with_the_token_from_the_environment(tiny_runs: Path, tls: tuple[Path, Path]) -> None:
    cert, key = tls
    server = ServeProcess(["--runs-dir", str(tiny_runs), "--certfile", str(cert), "--keyfile", str(key)], env={**os.environ, "LSTMLM_SERVE_TOKEN": TOKEN})
    try:
        server.wait_serving()
        assert server.url.startswith("https://127.0.0.1:")
        deadline = time.monotonic() + 30
        while len(server.lines) < 2 and time.monotonic() < deadline:  # the line after "serving the runs ..." may still be on its way
            time.sleep(0.05)
        assert server.lines[1] == f"every request needs the token; a browser opens {server.url}/?token=TOKEN once"
        context = ssl.create_default_context(cafile=str(cert))  # the client checks the certificate and its name
        status, text = request(server, "GET", "/api/status", context)
        assert status == 401 and json.loads(text) == {"error": NEEDS}
        assert request(server, "GET", "/api/status", context, token=TOKEN)[0] == 200
        status, text = request(server, "POST", "/api/generate", context, GENERATE, token=TOKEN)  # a stream, over TLS
        events = sse_events(text)
        assert status == 200 and events[0][0] == "start" and events[-1][0] == "done"
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the certificate is not fooled
            request(server, "GET", "/api/status", ssl.create_default_context(), token=TOKEN)
        plain = http.client.HTTPConnection(*server.address, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)):  # no plain HTTP on the port
            plain.request("GET", "/api/status")
            plain.getresponse()
        plain.close()
        assert server.stop() == 0
        assert not any("Traceback" in line for line in server.lines)
    finally:
        server.stop()


def test_another_address_with_a_token_warns_that_plain_http_carries_it_in_clear(tiny_runs: Path, serve_process: Any) -> None:
    server = serve_process("--runs-dir", tiny_runs, "--host", "0.0.0.0", "--token", TOKEN)
    assert server.lines[0] == "warning: serving on 0.0.0.0: over plain HTTP the token crosses the network in clear (--certfile and --keyfile serve HTTPS)"
    connection = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=10)
    connection.request("GET", "/api/status")
    assert connection.getresponse().status == 401
    connection.close()


def test_the_page_in_a_browser_opened_once_with_the_token(tiny_runs: Path, serve_process: Any, tmp_path: Path) -> None:
    driver = chromium(tmp_path / "profile")  # or a skip, saying what is missing
    from selenium.webdriver.support.ui import Select, WebDriverWait

    try:
        server = serve_process("--runs-dir", tiny_runs, "--token", TOKEN)
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        assert NEEDS in driver.page_source  # no token, no page
        driver.get(f"{server.url}/?token={TOKEN}")
        assert driver.current_url.split("#")[0] == server.url + "/"  # the token is gone from the address bar (the page names its run after a #)
        wait.until(lambda d: {"raw", "d2l"} <= {o.get_attribute("value") for o in Select(d.find_element("id", "run")).options})
        Select(driver.find_element("id", "run")).select_by_value("raw")
        prefix = driver.find_element("id", "prefix")
        prefix.clear()
        prefix.send_keys("the")
        driver.find_element("id", "go").click()  # a stream, by EventSource: the cookie carries the token
        wait.until(lambda d: "ended it" in d.find_element("id", "status").text)
        assert driver.find_element("id", "output").text.startswith("the")
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly: no script reads it
        driver.delete_all_cookies()
        driver.get(server.url + "/")
        assert NEEDS in driver.page_source
    finally:
        driver.quit()
