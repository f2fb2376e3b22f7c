"""Running the appliance: bind the socket, print where it listens, serve until signalled."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from appliance._private.app import create_app
from appliance._private.config import ApplianceConfig
from appliance._private.errors import ModelLoadError

log = logging.getLogger("palisade.appliance")


def check_models(config: ApplianceConfig) -> None:
    """Fail before binding when a model file is missing, with the command that fixes it."""
    for model in config.models:
        path = config.model_path(model)
        if not path.is_file():
            raise ModelLoadError(
                f"Model file {path} for `{model.id}` does not exist. Run "
                "`palisade models fetch-default` for the default model, or fix `path` in the "
                "appliance config."
            )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ModelLoadError(
            f"Cannot listen on {host}:{port}: {exc.strerror}. Pick another --port "
            "(0 picks a free one) or stop whatever holds it."
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ApplianceConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    check_models(config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    app, state = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )

    def stop_on_fatal() -> None:
        server.should_exit = True

    state.on_fatal = stop_on_fatal
    url = f"http://{_url_host(host)}:{port}"
    _announce(config, url)
    server.run(sockets=[sock])
    if state.load_error is not None:
        return 1
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _announce(config: ApplianceConfig, url: str) -> None:
    model = config.models[0].id
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    sys.stdout.write(
        f"Palisade appliance {config.node_id} (region {config.region}) listening on {url}\n"
        f"  models: {', '.join(m.id for m in config.models)}\n"
        f"  try:    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'\n"
    )
    sys.stdout.flush()
