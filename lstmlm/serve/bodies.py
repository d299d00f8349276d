"""The request bodies of the API, and their validation errors in words (`describe`). A
generation's sampling options are `Sampling`'s fields, with its bounds and help: one
declaration for the command line and the API (`sampling.option`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model

from ..sampling import Sampling


def characters(text: str) -> str:
    """A text whose every code point is a character: JSON may escape a lone surrogate
    ("\\udc00"), which no answer could send back in UTF-8 (an inspection's echoed it: a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{text[e.start]!r} (at {e.start}) is a lone surrogate, not a character") from None
    return text


Text = Annotated[str, AfterValidator(characters)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=100)]
MAX_STOPS = 16
PER_REQUEST = ("num_samples",)  # a request is one continuation


class Strict(BaseModel):
    """A request body: unknown fields refused, no NaN or infinity, no strings taken for numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class GenerateFields(Strict):
    """A generation request besides its sampling options (`GenerateRequest` adds those)."""

    run: str
    prefix: Text
    prime: bool = True
    best: bool = False
    stream: bool = True

    def sampling(self) -> Sampling:
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(Sampling) if f.name not in PER_REQUEST}
        return Sampling(**{**options, "stop": tuple(options["stop"])})


def sampling_fields() -> dict[str, Any]:
    """Each field of `Sampling` as a request's field: its type, default, bounds and help."""
    hints = get_type_hints(Sampling)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Sampling):
        if f.name in PER_REQUEST:
            continue
        low, high, help = f.metadata["low"], f.metadata["high"], f.metadata["help"]
        if f.name == "stop":
            fields[f.name] = (list[StopString], Field(default_factory=list, max_length=MAX_STOPS, description=help))
        else:
            fields[f.name] = (hints[f.name], Field(f.default, ge=low, le=high, description=help))
    return fields


if TYPE_CHECKING:  # to a type checker, the fields declared here; `sampling()` gives the rest, typed
    GenerateRequest = GenerateFields
else:  # the options of `lstmlm generate`, with its defaults
    GenerateRequest = create_model("GenerateRequest", __base__=GenerateFields, **sampling_fields())


class InspectRequest(Strict):
    """What `lstmlm inspect` reads, and which values to send back per character."""

    run: str
    text: Text
    gate: str | None = Field(None, max_length=32)  # one of the run's cell's gates (`Cell.gates`); None: the cell's default
    layer: int | None = Field(None, ge=0)
    units: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=32)
    top: int = Field(5, ge=0, le=32)  # per character, this many units furthest from neutral
    prime: bool = True  # read the run's prime first, as generation does
    best: bool = False


def describe(error: Any) -> str:
    """One validation error in words: the field, then what is wrong with it."""
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    if error["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if error["type"] == "missing":
        return f"missing field {where!r}"
    message = str(error["msg"]).removeprefix("Value error, ")  # a validator's own words (bodies.characters)
    return f"{where}: {message}" if where else message
