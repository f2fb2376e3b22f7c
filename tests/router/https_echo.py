"""A tiny HTTPS server that answers with its own name: a stand-in router behind HAProxy.

    python -m tests.router.https_echo --name a --cert public.pem --key node.key [--not-ready]

`GET /readyz` answers 200 (503 with --not-ready); any other GET answers the name. It
prints `listening on https://127.0.0.1:<port>` once it accepts connections.
"""

from __future__ import annotations

import argparse
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--not-ready", action="store_true")
    options = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(options.cert, options.key)
    name: str = options.name
    ready = not options.not_ready

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/readyz":
                self._answer(200 if ready else 503, b"ready" if ready else b"not ready")
            else:
                self._answer(200, name.encode())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # HAProxy's checks every 500 ms would fill the test's output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # The handshake in the handler's thread: a check that connects and leaves blocks no one.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    print(f"listening on https://127.0.0.1:{server.server_address[1]}", flush=True)  # noqa: T201
    server.serve_forever()


if __name__ == "__main__":
    main()
