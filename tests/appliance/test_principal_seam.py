"""Every inference route gets its principal from one dependency: swap it, and all obey."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Request

from appliance import ApplianceConfig, LlamaCppModel, create_app
from federation import AuthenticationError, Principal
from tests.conftest import MODEL
from tests.support import default_model_path, wait_for


async def header_principal(request: Request[Any, Any, Any]) -> Principal:
    regions = request.headers.get("x-test-regions")
    if regions is None:
        raise AuthenticationError("No test principal header.")
    return Principal(org="acme", user="ada", regions=frozenset(regions.split(",")))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    config = ApplianceConfig(
        region="eu-west",
        models=[LlamaCppModel(id=MODEL, path=str(default_model_path()), embeddings=False)],
    )
    app, _ = create_app(config, authenticate=header_principal)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ready(url))
    try:
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


CALLS = [
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
def test_every_inference_route_asks_the_authenticator(
    server: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    response = httpx.request(method, f"{server}{path}", json=body)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path", "body"), CALLS[:3])
def test_a_principal_outside_this_region_is_refused(
    server: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    response = httpx.request(
        method, f"{server}{path}", json=body, headers={"x-test-regions": "us-east"}
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "residency_violation"


def test_a_principal_in_region_is_served(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/chat/completions",
        json=CALLS[0][2],
        timeout=60,
        headers={"x-test-regions": "eu-west,us-east"},
    )
    assert response.status_code == 200
    assert response.headers["x-palisade-region"] == "eu-west"


def test_ops_routes_need_no_principal(server: str) -> None:
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/metrics").status_code == 200
