"""`[discovery]`: whether a process takes part in zeroconf discovery, and on which interfaces.

Apart from `discovery.py` so that reading a config does not import zeroconf.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

DEFAULT_INTERFACES = ("127.0.0.1",)


def check_interface(address: str) -> str:
    """`address` when it names one IPv4 interface (0.0.0.0 would mean all of them)."""
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IPv4 address") from None
    if parsed.is_unspecified or parsed.is_multicast or address == "255.255.255.255":
        raise ValueError(
            f"{address} is not one interface's address; list the addresses of the interfaces "
            "to announce on, e.g. 127.0.0.1"
        )
    return address


class DiscoveryConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """`[discovery]` in the appliance and router configs."""

    enabled: bool = False
    # IPv4 addresses of the interfaces zeroconf announces and listens on; never "all".
    interfaces: Annotated[list[str], Meta(min_length=1, max_length=32)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_INTERFACES)
    )
    # How long an enrolled appliance with no router URL looks for its router when it starts.
    find_router_s: Annotated[float, Meta(gt=0, le=300)] = 5.0

    def switched(self, enabled: bool | None) -> DiscoveryConfig:
        """This config as a `--discovery/--no-discovery` flag sets it (None: as it is)."""
        return self if enabled is None else msgspec.structs.replace(self, enabled=enabled)

    def __post_init__(self) -> None:
        for address in self.interfaces:
            try:
                check_interface(address)
            except ValueError as exc:
                raise ValueError(f"`interfaces`: {exc}") from None
