"""One request's audit row: the record the router and the appliances both write.

The router writes one per call it settles (`tried` lists every node it attempted); an
appliance writes one per request it admitted, and, for a request a router sent it, the
router's own request id in `fleet_request`, so that a fleet's evidence can be checked as one
(`compliance/_private/fleet_evidence.py`). A request that no node served (refused, or failed
before reaching one) has `NOT_ROUTED` as its region and node, in audit rows and usage rows
alike.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

# The region and node of a request that no node served.
NOT_ROUTED = "-"
# The header on which the router tells a node its request id (recorded as `fleet_request`
# only when the caller is router-vouched: anyone else could set it).
FLEET_REQUEST_HEADER = "X-Palisade-Fleet-Request"
_FLEET_REQUEST = re.compile(r"route-[0-9a-f]{24}")


class RequestRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request's audit row (fields left at their defaults are not written)."""

    id: str
    org: str
    user: str
    key_id: str | None
    model: str
    region: str
    node: str
    input_tokens: int
    output_tokens: int
    status: str
    tried: list[str] | None = None  # the router's rows: every node attempted, in order
    model_version: str | None = None
    via: str | None = None  # who vouched for the caller (a router id, or the fleet policy)
    fleet_request: str | None = None  # on a node's row: the router's id for the request
    edge: bool = False  # on the router's log: a row a node admitted itself and reported

    def row(self) -> dict[str, Any]:
        """The row as the audit log stores it."""
        row: dict[str, Any] = msgspec.to_builtins(self)
        return row


def fleet_request_id(header: str | None) -> str | None:
    """The router's request id from its header, if it has the router's form (else None)."""
    if header is None or _FLEET_REQUEST.fullmatch(header) is None:
        return None
    return header
