"""Reading a generation that `lstmlm serve` streams (POST /api/generate: `event: text` lines,
then `event: done`), for the benchmarks that load a server."""

from __future__ import annotations

import http.client
import json
import time


def read_stream(response: http.client.HTTPResponse, start: float) -> tuple[str, float, int]:
    """(outcome, seconds from `start` to the first characters, characters) of a streamed answer
    that began with 200: "completed" at its done event, "cut short" where the stream ends first,
    the error's name where reading it fails (the characters counted until then)."""
    first, chars, name = float("nan"), 0, ""
    try:
        while line := response.readline():
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                name = text[7:]
            elif text.startswith("data: ") and name == "text":
                if chars == 0:
                    first = time.perf_counter() - start
                chars += len(json.loads(text[6:])["text"])
            elif text.startswith("data: ") and name == "done":
                return "completed", first, chars
    except OSError as e:
        return type(e).__name__, first, chars
    return "cut short", first, chars
