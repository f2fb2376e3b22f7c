"""Running the appliance: bind the socket, print where it listens, serve until signalled."""

from __future__ import annotations

import ipaddress
import logging
import sys

from appliance._private.app import create_app
from appliance._private.config import ApplianceConfig
from appliance._private.errors import ModelLoadError
from appliance._private.upstream import upstream_key
from compliance import Recorder
from federation import (
    ConfigError,
    Tenancy,
    bind_socket,
    join_secret,
    make_server,
    url_of,
)

log = logging.getLogger("palisade.appliance")


def check_models(config: ApplianceConfig) -> None:
    """Fail before binding when a model file or an upstream key is missing, saying how to fix
    it. (Whether an upstream answers is checked when the model loads.)"""
    for model in config.models:
        if model.engine == "openai":
            upstream_key(model)
            continue
        path = config.model_path(model)
        if not path.is_file():
            raise ModelLoadError(
                f"Model file {path} for `{model.id}` does not exist. Run "
                "`palisade models fetch-default` for the default model, or fix `path` in the "
                "appliance config."
            )


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
    if no_auth and demo:
        raise ConfigError("--demo makes a demo org and key; it needs keys, so drop --no-auth.")
    secret = _fleet_secret(config, no_auth=no_auth, host=config.host)
    sock = bind_socket(config.host, config.port)
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
    app, state = create_app(
        config, tenancy=tenancy, demo=demo, recorder=recorder, join_secret=secret
    )
    server = make_server(app, config.server)

    def stop_on_fatal() -> None:
        server.should_exit = True

    state.on_fatal = stop_on_fatal
    url = url_of(sock)
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


def _fleet_secret(config: ApplianceConfig, *, no_auth: bool, host: str) -> bytes | None:
    """The join secret when this node joins a router's fleet (checked before serving)."""
    if config.router_url is None:
        return None
    if no_auth:
        raise ConfigError(
            "--no-auth cannot be combined with --router: a fleet member checks the router's "
            "signed assertions and local keys. Drop --no-auth."
        )
    if config.advertise_url is None and host in ("0.0.0.0", "::"):  # noqa: S104 - a check
        raise ConfigError(
            f"This node listens on {host}, so the router cannot be told one address to reach "
            "it: set --advertise-url (or `advertise_url` in the config), e.g. "
            "http://10.0.0.5:8400."
        )
    return join_secret(required=True)


def _recorder(config: ApplianceConfig) -> Recorder:
    return Recorder(
        config.home(),
        origin=config.node_id,
        floor=config.logging_floor,
        retention_days=config.content_retention_days,
    )


def _announce(config: ApplianceConfig, url: str, *, no_auth: bool) -> None:
    model = config.models[0].id
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    auth = "" if no_auth else '-H "Authorization: Bearer $PALISADE_API_KEY" '
    mode = "authentication OFF (--no-auth)" if no_auth else "API keys required"
    fleet = f", fleet member of {config.router_url}" if config.router_url else ""
    sys.stdout.write(
        f"Palisade appliance {config.node_id} (region {config.region}{fleet}) "
        f"listening on {url}\n"
        f"  models: {', '.join(m.id for m in config.models)} ({mode})\n"
        f"  try:    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}-d '{body}'\n"
    )
    sys.stdout.flush()
