"""Wire schema of the fleet protocol (`/federation/v1/...`): heartbeats and the fleet view.

An appliance sends a `Heartbeat` every second; the first one registers it. The router
answers with a `HeartbeatReply` carrying its public key, which the appliance uses to
verify the principal assertions the router attaches to forwarded requests. Both bodies
are signed with the fleet join secret (see `join`). New fields go last with defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from federation._private.openai_wire import Pricing
from federation._private.vocabulary import DeviceClass

Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
NodeState = Literal["up", "down", "ejected"]


class NodeModel(Struct, kw_only=True):
    """One model a node serves, with its declared device class and live latency."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    device_class: DeviceClass
    context_length: int
    ready: bool
    pricing: Pricing = msgspec.field(default_factory=Pricing)
    ttft_ewma_ms: float | None = None
    tpot_ewma_ms: float | None = None
    ttft_p50_ms: float | None = None
    queue_depth: int = 0
    in_flight: int = 0
    tpot_p50_ms: float | None = None
    # What runs it: the engine tag, where it runs ("cpu", "cuda:0", an ONNX execution
    # provider), and the model's version and SHA-256 (of its file or directory manifest).
    engine: str | None = None
    accelerator: str | None = None
    version: str | None = None
    sha256: str | None = None
    # What it serves beyond plain generation (`ModelCard.capabilities`): the router's
    # model card lists what every node serving the model serves.
    capabilities: list[str] = msgspec.field(default_factory=list)


class Heartbeat(Struct, kw_only=True):
    """What an appliance tells the router every second (the first one registers it)."""

    node_id: Name
    region: Name
    url: Annotated[str, Meta(pattern=r"^https?://")]
    version: str
    models: list[NodeModel]
    sequence: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    ttft_ewma_ms: float | None = None
    tpot_ewma_ms: float | None = None
    # Random per process start: a new value from the same node id means it restarted.
    boot_id: Annotated[str, Meta(max_length=64)] = ""
    # When the node lost its router (unix s), sent after it reconnects until the usage it
    # served offline is reconciled (the offline edge).
    offline_since: float | None = None


class HeartbeatReply(Struct, kw_only=True):
    """The router's answer: its assertion-signing key and the cadence it expects."""

    router_id: str
    router_public_key: str
    interval_s: float
    missed_beats_down: int
    # The policy snapshot version the router publishes: a node holding an older one fetches.
    policy_version: int = 0


class FleetNode(Struct, kw_only=True):
    """One row of `palisade fleet status`."""

    node_id: str
    region: str
    url: str
    device_classes: list[str]
    models: list[str]
    state: NodeState
    in_flight: int
    queue_depth: int
    ttft_p50_ms: float | None
    heartbeat_age_s: float
    version: str
    consecutive_failures: int = 0
    # Every declared model is loaded and accepting on the node.
    ready: bool = False
    # Restarts seen (a new boot id) since the router started, and whether they come so
    # often that the node counts as crash-looping.
    restarts: int = 0
    crash_loop: bool = False
    # Unix s: for a down node, its last heartbeat; for an up one, the outage it reported
    # and is still reconciling.
    offline_since: float | None = None
    # The appliance image it last reported running (`PUT /federation/v1/image`), whether
    # that image is committed or still on trial, and from which slot; None before any report.
    image_version: str | None = None
    image_committed: bool | None = None
    image_slot: str | None = None


class FleetStatus(Struct, kw_only=True):
    router_id: str
    nodes: list[FleetNode]


HEARTBEAT_DECODER = msgspec.json.Decoder(Heartbeat)
REPLY_DECODER = msgspec.json.Decoder(HeartbeatReply)
FLEET_DECODER = msgspec.json.Decoder(FleetStatus)
