"""Wire schema of appliance-image updates between a node's image agent and the router.

The router never reads a bundle: it stores the bytes an operator uploaded, offers them to
the nodes of one region in batches, and follows what each node reports. The node verifies
the bundle itself against its own pinned release keys. Every route takes the node's
identity from its client certificate, never from the body.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Meta(min_length=1, max_length=64)]
RolloutId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Slot = Literal["A", "B"]
# Where a node is with one image, in the order an update moves through them.
ImageState = Literal["installing", "installed", "trial", "committed", "rolled_back", "failed"]


class UpdateOffer(Struct, kw_only=True):
    """`GET /federation/v1/updates/next`: the bundle this node should install now."""

    rollout: RolloutId
    version: Version
    sha256: Sha256Hex
    size: Annotated[int, Meta(ge=1)]


class RolloutOutcome(Struct, kw_only=True, forbid_unknown_fields=True):
    """How far a node got with one rollout's bundle."""

    rollout: RolloutId
    state: ImageState
    detail: Annotated[str, Meta(max_length=500)] = ""


class ImageReport(Struct, kw_only=True, forbid_unknown_fields=True):
    """`PUT /federation/v1/image`: what a node runs now (sent at every boot and change)."""

    version: Version
    slot: Slot
    digest: Sha256Hex
    committed: bool
    outcome: RolloutOutcome | None = None


UPDATE_OFFER_DECODER = msgspec.json.Decoder(UpdateOffer)
IMAGE_REPORT_DECODER = msgspec.json.Decoder(ImageReport)
