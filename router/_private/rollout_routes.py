"""Fleet rollout routes (`palisade fleet update`; the policy is `rollout.py`).

    POST /admin/v1/fleet/updates?region=&version=&sha256=&batch=   system admin: the bundle
    GET  /admin/v1/fleet/updates                                   system admin: every rollout
    GET  /admin/v1/fleet/updates/{id}                              system admin: its progress
    POST /admin/v1/fleet/updates/{id}/stop                         system admin: stop it
    GET  /federation/v1/updates/next                               mTLS node: 204 or an offer
    GET  /federation/v1/updates/{id}/bundle                        mTLS node: the offered bundle
    PUT  /federation/v1/image                                      mTLS node: what it runs now

The upload is streamed to `fleet/updates/<id>.pimg.part` while it is hashed, and kept only
if its size and SHA-256 are the ones the operator declared (`max_bundle_bytes` bounds it).
The node routes take the node from its client certificate (`node_of`: the router's
`certified_node`, which refuses a revoked one), never from the body or the path: a node
may fetch only a bundle it was offered and report only for itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

from litestar import MediaType, Request, Response, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.exceptions import InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, Parameter
from litestar.response import File

from federation import (
    ENCODER,
    IMAGE_REPORT_DECODER,
    Action,
    APIError,
    Caller,
    ClientGoneError,
    InvalidRequestError,
    PeerIdentity,
    decode_request,
    read_body,
    require_everywhere,
)
from router._private.rollout import Rollout, RolloutList

if TYPE_CHECKING:
    from router._private.app import RouterState

log = logging.getLogger("palisade.router")

NodeOf = Callable[[Request[Any, Any, Any]], PeerIdentity]
# An `ImageReport` is a few hundred bytes; nothing a node says needs more.
MAX_REPORT_BYTES = 4096
MAX_BATCH = 10_000
_FLUSH_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,64}$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class BundleTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "bundle_too_large"


def rollout_routes(state: RouterState, node_of: NodeOf) -> list[HTTPRouteHandler]:
    """The routes above, over `state.rollouts`; `node_of(request)` is the calling node."""
    return [*_admin_routes(state), *_node_routes(state, node_of)]


def _admin_routes(state: RouterState) -> list[HTTPRouteHandler]:
    auth = {"caller": Provide(state.tenancy.admin_caller)}
    book = state.rollouts
    limit = state.config.max_bundle_bytes

    @post("/admin/v1/fleet/updates", dependencies=auth, request_max_body_size=limit)
    async def upload(  # noqa: PLR0917 - the query parameters of the upload
        request: Request[Any, Any, Any],
        caller: NamedDependency[Caller],
        region: str,
        version: str,
        sha256: str,
        batch: Annotated[int, Parameter(ge=1, le=MAX_BATCH)] = 1,
    ) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        _check_metadata(region, version, sha256)
        nodes = await asyncio.to_thread(_region_nodes, state, region)
        await asyncio.to_thread(book.check_can_start, region, nodes)
        rollout_id = book.new_id()
        path = book.bundle_path(rollout_id)
        size = await _receive_bundle(request, path, sha256)
        try:
            await state.tenancy.store.record_event(
                "fleet_update_created",
                caller.user.id,
                None,
                {
                    "rollout": rollout_id,
                    "region": region,
                    "version": version,
                    "sha256": sha256,
                    "size": size,
                    "batch": batch,
                    "nodes": sorted(nodes),
                },
            )
            rollout = await asyncio.to_thread(
                book.create,
                rollout_id,
                region=region,
                version=version,
                sha256=sha256,
                size=size,
                batch=batch,
                nodes=nodes,
                created_by=caller.user.id,
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        log.info(
            "rollout %s of %s to %s (%d nodes, batches of %d) by %s",
            rollout_id,
            version,
            region,
            len(nodes),
            batch,
            caller.user.id,
        )
        return _json(rollout, 201)

    @get("/admin/v1/fleet/updates", dependencies=auth)
    async def list_rollouts(caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        return _json(RolloutList(data=await asyncio.to_thread(book.list)))

    @get("/admin/v1/fleet/updates/{rollout_id:str}", dependencies=auth)
    async def show(rollout_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        return _json(await asyncio.to_thread(book.get, rollout_id))

    @post("/admin/v1/fleet/updates/{rollout_id:str}/stop", dependencies=auth, status_code=200)
    async def stop(rollout_id: FromPath[str], caller: NamedDependency[Caller]) -> Response[Any]:
        require_everywhere(caller.user.role, Action.MANAGE_FLEET)
        await asyncio.to_thread(book.get, rollout_id)  # 404 before anything is recorded
        await state.tenancy.store.record_event(
            "fleet_update_stopped", caller.user.id, None, {"rollout": rollout_id}
        )
        rollout = await asyncio.to_thread(book.stop, rollout_id, f"stopped by {caller.user.id}")
        log.warning("rollout %s stopped by %s", rollout_id, caller.user.id)
        return _json(rollout)

    return [upload, list_rollouts, show, stop]


def _node_routes(state: RouterState, node_of: NodeOf) -> list[HTTPRouteHandler]:
    book = state.rollouts

    @get("/federation/v1/updates/next")
    async def next_update(request: Request[Any, Any, Any]) -> Response[Any]:
        node = node_of(request)
        offer = await asyncio.to_thread(book.next_for, node.node_id, node.region or "")
        if offer is None:
            return Response(b"", status_code=204)
        return _json(offer)

    @get("/federation/v1/updates/{rollout_id:str}/bundle")
    async def bundle(request: Request[Any, Any, Any], rollout_id: FromPath[str]) -> File:
        node = node_of(request)
        path = await asyncio.to_thread(book.bundle_for, node.node_id, rollout_id)
        log.info("node %s downloads the bundle of rollout %s", node.node_id, rollout_id)
        return File(path, media_type="application/octet-stream", filename=path.name)

    @put("/federation/v1/image", request_max_body_size=MAX_REPORT_BYTES)
    async def image(request: Request[Any, Any, Any]) -> Response[Any]:
        node = node_of(request)
        report = decode_request(await read_body(request), IMAGE_REPORT_DECODER)
        ended = await asyncio.to_thread(book.report, node.node_id, node.region or "", report)
        if ended is not None:
            await _audit_end(state, ended, node.node_id)
        return _json({"node_id": node.node_id, "version": report.version, "recorded": True})

    return [next_update, bundle, image]


def _check_metadata(region: str, version: str, sha256: str) -> None:
    for name, value, pattern in (
        ("region", region, _REGION),
        ("version", version, _VERSION),
        ("sha256", sha256, _SHA256),
    ):
        if pattern.match(value) is None:
            raise InvalidRequestError(
                f"Invalid value for `{name}`: {value[:80]!r} (expected {pattern.pattern}).",
                code="invalid_value",
                param=name,
            )


def _region_nodes(state: RouterState, region: str) -> list[str]:
    """The enrolled, unrevoked nodes of `region`: those a rollout there goes to."""
    return [
        node.node_id
        for node in state.registry.nodes()
        if node.region == region and node.state == "enrolled"
    ]


async def _receive_bundle(request: Request[Any, Any, Any], path: Path, sha256: str) -> int:
    """Stream the body to `path` (via `.part`), checking its SHA-256; returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = path.with_name(path.name + ".part")
    try:
        with part.open("wb") as out:
            size, received = await _copy(request, out)
            await asyncio.to_thread(_sync, out)
        if size == 0 or received != sha256:
            raise InvalidRequestError(
                f"The uploaded bundle ({size} bytes) has SHA-256 {received}, not the {sha256} "
                "declared; the upload was cut short or changed. Nothing was kept.",
                code="bundle_sha256_mismatch",
                param="sha256",
            )
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return size


async def _copy(request: Request[Any, Any, Any], out: BinaryIO) -> tuple[int, str]:
    """Copy the request body into `out`; returns its size and SHA-256. Hashing and writing
    run on a worker thread, a megabyte at a time, so a large upload never holds up the
    event loop (and with it every inference request through this router)."""
    digest = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    try:
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if sum(map(len, pending)) >= _FLUSH_BYTES:
                await asyncio.to_thread(_absorb, b"".join(pending), out, digest)
                pending.clear()
        await asyncio.to_thread(_absorb, b"".join(pending), out, digest)
    except RequestEntityTooLarge:
        limit = request.route_handler.resolve_request_max_body_size()
        raise BundleTooLargeError(
            f"The bundle is larger than this router accepts ({limit} bytes); raise "
            "`max_bundle_bytes` in the router config.",
            param="body",
        ) from None
    except InternalServerException as exc:
        if "disconnected" in str(exc.detail):
            raise ClientGoneError from None
        raise
    return size, digest.hexdigest()


def _absorb(data: bytes, out: BinaryIO, digest: hashlib._Hash) -> None:
    digest.update(data)
    out.write(data)


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


async def _audit_end(state: RouterState, rollout: Rollout, node_id: str) -> None:
    """A node's report ended the rollout: stopped by a failure, or completed."""
    await state.tenancy.store.record_event(
        f"fleet_update_{rollout.state}",
        f"node:{node_id}",
        None,
        {"rollout": rollout.id, "version": rollout.version, "reason": rollout.reason},
    )
    log.warning("rollout %s %s: %s", rollout.id, rollout.state, rollout.reason or "all done")


def _json(payload: object, status: int = 200) -> Response[Any]:
    return Response(ENCODER.encode(payload), media_type=MediaType.JSON, status_code=status)
