"""Decoding of request bodies and config files, with errors that name the bad field."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from federation._private.errors import ConfigError, InvalidRequestError

T = TypeVar("T")

_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
# Deeper than any OpenAI request needs (tool schemas included), far shallower than the
# recursion limits of the decoders and encoders a body passes through.
MAX_JSON_DEPTH = 128
# Everything but the bytes that open or close arrays, objects and strings.
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')


class _Located:
    """A msgspec validation message split into what went wrong and where."""

    def __init__(self, exc: msgspec.ValidationError) -> None:
        text = str(exc)
        match = _AT_PATH.search(text)
        self.path = match["path"].lstrip(".") if match else ""
        self.problem = text[: match.start()] if match else text
        self.unknown = _UNKNOWN.match(self.problem)
        self.missing = _MISSING.match(self.problem)

    @property
    def field(self) -> str:
        """The dotted path of the offending field, e.g. `messages[0].content`."""
        named = self.unknown or self.missing
        if named is None:
            return self.path
        return f"{self.path}.{named['name']}" if self.path else named["name"]


def decode_request(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a JSON request body, turning every failure into a 400 that names the field."""
    if _too_deep(body):
        raise _too_deep_error()
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _request_error(_Located(exc)) from exc
    except RecursionError as exc:
        raise _too_deep_error() from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(
            f"The request body is not valid JSON ({exc}). Send a JSON object with "
            "Content-Type: application/json.",
            code="invalid_json",
        ) from exc


def _too_deep(body: bytes) -> bool:
    """Whether arrays and objects nest more than MAX_JSON_DEPTH deep (strings skipped).

    Escaped backslashes and quotes go first, then every byte that is not a bracket or a
    quote (at C speed), then the strings: what is left is only the nesting.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False  # the common case, without a scan
    bare = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    depth = 0
    for byte in _STRING.sub(b"", bare):
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def _too_deep_error() -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
        "no request needs that many. Flatten it.",
        code="invalid_json",
    )


def _request_error(where: _Located) -> InvalidRequestError:
    field = where.field
    if where.unknown:
        return InvalidRequestError(
            f"Unrecognized request parameter `{field}`: this server does not support it. "
            "Remove it from the request.",
            code="unknown_parameter",
            param=field,
        )
    if where.missing:
        return InvalidRequestError(
            f"Missing required parameter `{field}`.",
            code="missing_required_parameter",
            param=field,
        )
    return InvalidRequestError(
        f"Invalid value for `{field or 'body'}`: {where.problem}.",
        code="invalid_value",
        param=field or None,
    )


def load_config(path: Path, config_type: type[T]) -> T:
    """Parse a TOML file into `config_type`, naming the bad key and what was expected."""
    return convert_config(read_toml(path), config_type, source=str(path))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML config file's tables, or a `ConfigError` saying what is wrong with the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist; check the --config path.") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read: {exc.strerror}.") from exc
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from exc
    return data


def convert_config(data: dict[str, Any], config_type: type[T], *, source: str) -> T:
    """Validate already-parsed config data (e.g. TOML merged with flags)."""
    try:
        return msgspec.convert(data, config_type)
    except msgspec.ValidationError as exc:
        where = _Located(exc)
        if where.unknown:
            message = f"unknown key `{where.field}`; check its spelling against the docs"
        elif where.missing:
            message = f"missing required key `{where.field}`"
        else:
            message = f"bad value for key `{where.field}`: {where.problem}"
        raise ConfigError(f"{source}: {message}.") from exc
