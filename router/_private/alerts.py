"""`palisade alerts tail`: a small Alertmanager webhook receiver that prints each alert.

Alertmanager POSTs `{"alerts": [...], ...}` (webhook_config, version 4) to the URL the
generated alertmanager.yml names; each alert becomes one line on stdout, or one JSON object
per line with `--json`. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import typer

DEFAULT_ALERTS_PORT = 9095
_MAX_BODY = 1024 * 1024

alerts_cli = typer.Typer(help="Receive and print Alertmanager's alerts.", no_args_is_help=True)


def alert_line(alert: dict[str, Any]) -> str:
    """`firing PalisadeNodeDown node=eu-1 region=eu-west: summary` (labels sorted)."""
    labels = dict(alert.get("labels") or {})
    name = labels.pop("alertname", "alert")
    shown = " ".join(f"{key}={value}" for key, value in sorted(labels.items()))
    summary = (alert.get("annotations") or {}).get("summary", "")
    status = alert.get("status", "firing")
    return f"{status} {name} {shown}" + (f": {summary}" if summary else "")


class AlertReceiver:
    """A webhook receiver on `host:port` (0: a free port) calling `emit` once per alert."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], host: str, port: int) -> None:
        emitted = emit

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= _MAX_BODY:
                    self.send_response(413 if length else 400)
                    self.end_headers()
                    return
                try:
                    payload = json.loads(self.rfile.read(length))
                    alerts = payload["alerts"]
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                    self.end_headers()
                    return
                for alert in alerts if isinstance(alerts, list) else []:
                    if isinstance(alert, dict):
                        emitted(alert)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None  # each alert is printed; requests are not

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AlertReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


@alerts_cli.command("tail")
def tail_command(
    port: Annotated[
        int, typer.Option(help="Port to receive Alertmanager's webhook on.")
    ] = DEFAULT_ALERTS_PORT,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per alert instead of a line.")
    ] = False,
) -> None:
    """Receive Alertmanager's webhook and print each alert as it arrives (Ctrl-C stops)."""
    lock = threading.Lock()

    def emit(alert: dict[str, Any]) -> None:
        text = json.dumps(alert, sort_keys=True) if as_json else alert_line(alert)
        with lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    with AlertReceiver(emit, host, port) as receiver:
        sys.stderr.write(f"receiving alerts on {receiver.url}\n")
        sys.stderr.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
