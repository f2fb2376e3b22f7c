"""Running the appliance: bind the socket, print where it listens, serve until signalled."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

import uvicorn

from appliance._private.app import create_app
from appliance._private.config import ApplianceConfig
from appliance._private.errors import ModelLoadError
from compliance import Recorder
from federation import ConfigError, Tenancy

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


def check_no_auth(config: ApplianceConfig) -> None:
    """`--no-auth` serves one person on one machine: loopback only."""
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback:
        raise ConfigError(
            f"--no-auth refuses to listen on {config.host}: without keys anyone who can reach "
            "the port could use the appliance. Listen on 127.0.0.1 (or ::1), or drop --no-auth."
        )


def serve(config: ApplianceConfig, *, no_auth: bool = False, demo: bool = False) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    check_models(config)
    if no_auth:
        check_no_auth(config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    recorder = None if no_auth else _recorder(config)
    tenancy = None
    if recorder is not None:
        tenancy = Tenancy(
            config.home(),
            region=config.region,
            node=config.node_id,
            audit=recorder,
            logging_floor=config.logging_floor,
        )
    if no_auth and demo:
        raise ConfigError("--demo makes a demo org and key; it needs keys, so drop --no-auth.")
    app, state = create_app(config, tenancy=tenancy, demo=demo, recorder=recorder)
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
    state.url = url
    if no_auth:
        log.warning(
            "AUTHENTICATION IS OFF (--no-auth): every request is served without a key and the "
            "management API is disabled. Listening on loopback only."
        )
    _announce(config, url, no_auth=no_auth)
    server.run(sockets=[sock])
    if state.load_error is not None:
        return 1
    return 0


def _recorder(config: ApplianceConfig) -> Recorder:
    return Recorder(
        config.home(),
        origin=config.node_id,
        floor=config.logging_floor,
        retention_days=config.content_retention_days,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _announce(config: ApplianceConfig, url: str, *, no_auth: bool) -> None:
    model = config.models[0].id
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    auth = "" if no_auth else '-H "Authorization: Bearer $PALISADE_API_KEY" '
    mode = "authentication OFF (--no-auth)" if no_auth else "API keys required"
    sys.stdout.write(
        f"Palisade appliance {config.node_id} (region {config.region}) listening on {url}\n"
        f"  models: {', '.join(m.id for m in config.models)} ({mode})\n"
        f"  try:    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}-d '{body}'\n"
    )
    sys.stdout.flush()
