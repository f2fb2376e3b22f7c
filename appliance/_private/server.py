"""Running the appliance: bind the socket, print where it listens, serve until signalled."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import sys
from collections.abc import Callable

import msgspec

from appliance._private.app import ApplianceState, create_app
from appliance._private.config import ApplianceConfig
from appliance._private.engines.registry import ModelConfig
from appliance._private.errors import ModelLoadError
from appliance._private.http.openai_routes import INFERENCE_PATHS
from appliance._private.model_overlay import ModelOverlay
from compliance import Recorder
from federation import (
    ConfigError,
    Listener,
    NodeCredentials,
    PalisadeError,
    Tenancy,
    announce_lab_secret,
    bind_socket,
    join_secret,
    make_server,
    observed,
    server_context,
    start_tracing,
    url_of,
)

log = logging.getLogger("palisade.appliance")


def check_models(config: ApplianceConfig) -> None:
    """Fail before binding when a model file or what its engine needs first (an upstream's
    key) is missing, saying how to fix it. (Whether it loads is checked when it loads.)"""
    for model in config.models:
        model.preflight()
        path = config.model_path(model)
        if path is not None and not path.exists():
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


def serve(
    config: ApplianceConfig,
    *,
    no_auth: bool = False,
    demo: bool = False,
    credentials: NodeCredentials | None = None,
    reread: Callable[[], list[ModelConfig]] | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code. `credentials`: the node's
    enrolled fleet credentials (see `fleet_settings`), served with and presented to the
    router. The models are the config's with the model overlay applied; on SIGHUP they are
    `reread()` (the config file again; default: the same models) with the overlay, and the
    served models reconciled with them."""
    overlay = ModelOverlay(config.home())
    config = msgspec.structs.replace(config, models=overlay.apply(config.models))
    check_models(config)
    if no_auth:
        check_no_auth(config)
    if no_auth and demo:
        raise ConfigError("--demo makes a demo org and key; it needs keys, so drop --no-auth.")
    lab_secret = _fleet_transport(config, credentials, no_auth=no_auth, host=config.host)
    tls = _listener_tls(config, credentials)
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
            database=config.database,
        )
    app, state = create_app(
        config,
        tenancy=tenancy,
        demo=demo,
        recorder=recorder,
        credentials=credentials,
        lab_secret=lab_secret,
    )
    _use_tls(state, tls, credentials)
    first_models = config.models
    app.on_startup.append(
        _reconcile_on_sighup(state, lambda: overlay.apply(reread() if reread else first_models))
    )
    tracing = start_tracing(
        config.traces, service="palisade-appliance", node=config.node_id, region=config.region
    )
    traced = observed(app, routes=INFERENCE_PATHS, tracing=tracing)
    server = make_server(traced, config.server, [Listener(sock, tls)])
    state.drop_revoked = server.drop_revoked  # a new CRL cuts connections already open

    def stop_on_fatal() -> None:
        server.should_exit = True

    state.on_fatal = stop_on_fatal
    url = url_of(sock, "https" if tls is not None else "http")
    state.url = url
    if no_auth:
        log.warning(
            "AUTHENTICATION IS OFF (--no-auth): every request is served without a key and the "
            "management API is disabled. Listening on loopback only."
        )
    _announce(config, url, no_auth=no_auth)
    try:
        server.run()
    finally:
        if tracing is not None:
            tracing.close()  # the spans still queued
    if state.load_error is not None:
        return 1
    return 0


def _reconcile_on_sighup(
    state: ApplianceState, models: Callable[[], list[ModelConfig]]
) -> Callable[[], None]:
    """A startup hook: on SIGHUP, serve `models()` (add, reload what changed, remove what
    is gone), one SIGHUP after another. A config that does not read changes nothing."""
    hangups: set[asyncio.Task[None]] = set()
    lock = asyncio.Lock()

    async def reconcile() -> None:
        async with lock:
            try:
                wanted = models()
            except PalisadeError as exc:
                log.error("SIGHUP: config not re-read, nothing changed: %s", exc)  # noqa: TRY400
                return
            done = await state.models.reconcile(wanted)
            log.info(
                "SIGHUP: models added %s, reloaded %s, repriced %s, removed %s, failed %s",
                done.added,
                done.reloaded,
                done.repriced,
                done.removed,
                sorted(done.failed),
            )

    def hangup() -> None:
        task = asyncio.get_running_loop().create_task(reconcile())
        hangups.add(task)
        task.add_done_callback(hangups.discard)

    def install() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)

    return install


def fleet_settings(
    config: ApplianceConfig,
    credentials: NodeCredentials,
    *,
    node_id: str | None = None,
    region: str | None = None,
) -> ApplianceConfig:
    """An enrolled node is what its certificate says: its node id, region and device class
    come from it (a flag that says otherwise is refused), and it joins the router it
    enrolled with unless `router_url` names another."""
    if not credentials.enrolled:
        return config
    identity = credentials.identity()
    for flag, given, certified in (
        ("--node-id", node_id, identity.node_id),
        ("--region", region, identity.region),
    ):
        if given is not None and given != certified:
            raise ConfigError(
                f"{flag} {given} disagrees with this node's certificate ({certified}): an "
                "enrolled node is what its certificate says. Drop the flag, or enroll again "
                "with a token for the other identity."
            )
    for model in config.models:
        if identity.device_class is not None and model.device_class != identity.device_class:
            raise ConfigError(
                f"Model `{model.id}` declares device_class = {model.device_class!r}, but this "
                f"node is certified for {identity.device_class!r} only; the router would refuse "
                "its heartbeats. Fix device_class in the config, or enroll with a token for "
                "the other device class."
            )
    state = credentials.state
    fleet_url = state.fleet_url if state is not None else None
    return msgspec.structs.replace(
        config,
        node_id=identity.node_id,
        region=identity.region or config.region,
        router_url=config.router_url or fleet_url,
    )


def _fleet_transport(
    config: ApplianceConfig, credentials: NodeCredentials | None, *, no_auth: bool, host: str
) -> bytes | None:
    """Check a fleet member's settings before serving; the lab join secret for an
    unenrolled one (None for an enrolled node, which uses mTLS)."""
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
            "https://10.0.0.5:8400."
        )
    if credentials is not None:
        return None
    secret = join_secret(required=False)
    if secret is None:
        raise ConfigError(
            "This node is not enrolled, so it cannot join a fleet: get a token from the "
            "router's operator (`palisade fleet token create`), then run `palisade node init` "
            "and `palisade node enroll`."
        )
    announce_lab_secret("appliance")
    return secret


def _listener_tls(
    config: ApplianceConfig, credentials: NodeCredentials | None
) -> ssl.SSLContext | None:
    """An enrolled node serves HTTPS with its node certificate and checks the client
    certificates it is offered (the router's) against the fleet CA and CRL; a standalone
    appliance serves HTTPS with `tls_cert`/`tls_key` when both are set."""
    if credentials is not None:
        if not credentials.crl_path.exists():
            raise ConfigError(
                f"{credentials.crl_path} is missing; enroll the node again "
                "(`palisade node enroll`) to fetch the fleet's revocation list."
            )
        return server_context(
            credentials.cert_path,
            credentials.key_path,
            credentials.ca_path,
            credentials.crl_path,
            client_certs=True,
        )
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("Set both tls_cert and tls_key to serve HTTPS, or neither.")
    try:
        return server_context(config.tls_cert, config.tls_key, None, None, client_certs=False)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"Cannot use {config.tls_cert} with {config.tls_key} for HTTPS: {exc}."
        ) from exc


def _use_tls(
    state: ApplianceState, tls: ssl.SSLContext | None, credentials: NodeCredentials | None
) -> None:
    """Give the app the listener's context: a new CRL (policy snapshot) and a renewed
    certificate (membership) take effect from the next handshake."""
    state.tls = tls
    if tls is None or credentials is None:
        return
    state.crl_path = credentials.crl_path
    if state.membership is not None:
        cert, key = credentials.cert_path, credentials.key_path
        state.membership.on_renewed.append(lambda: tls.load_cert_chain(cert, key))


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
