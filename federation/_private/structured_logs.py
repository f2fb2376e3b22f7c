"""The logs of a router or an appliance: plain text, or JSON lines for ELK and Splunk.

`[logs] format = "json"` (or `--log-format json`) writes one JSON object per line on
stderr: `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`, `node`, `region` (an
appliance's), and for a line written while a request is served its `request_id`,
`trace_id` and `org` (`request_context.py`). Access lines (one per inference request, on
by default with JSON) add `method`, `path`, `status` and `duration_ms`.

Nothing here reads a request's body: log lines hold ids, names, counts and codes, which
is also what makes the `zero` logging mode's promise (no content anywhere) hold for logs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

from federation._private.request_context import current_request

LogFormat = Literal["text", "json"]
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER: Final = "palisade.access"
# Attributes a log call may add with `extra=` that JSON lines carry as fields of their own.
_FIELDS: Final = ("method", "path", "status", "duration_ms", "model")
_ENCODER = msgspec.json.Encoder()


class LogsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """`[logs]` in the router and appliance configs."""

    # `json`: one object per line (timestamp, level, logger, message, node, request ids).
    format: LogFormat = "text"
    # One line per inference request (`palisade.access`); None: on with JSON, off with text.
    access: bool | None = None

    def access_lines(self) -> bool:
        return self.access if self.access is not None else self.format == "json"


class JsonLines(logging.Formatter):
    """One JSON object per record, with the request it belongs to (if any)."""

    def __init__(self, node: str, region: str | None) -> None:
        super().__init__()
        self._where: dict[str, str] = {"node": node}
        if region is not None:
            self._where["region"] = region

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._where,
        }
        request = current_request()
        if request is not None:
            entry["request_id"] = request.request_id
            entry["trace_id"] = request.trace_id
            if request.org is not None:
                entry["org"] = request.org
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry).decode()


def configure_logging(
    config: LogsConfig, *, node: str, region: str | None = None, level: int = logging.INFO
) -> None:
    """Send every log record (uvicorn's too) to stderr in `config.format`."""
    handler = logging.StreamHandler()
    if config.format == "json":
        handler.setFormatter(JsonLines(node, region))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).setLevel(
        logging.INFO if config.access_lines() else logging.WARNING
    )
