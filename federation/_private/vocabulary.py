"""Palisade's shared words, each defined once and typed: every package imports them here.

A new device class, logging mode or role is added here and nowhere else; tests check that
no module spells one of these sets out again.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# The accelerator a model runs on, as routed by (preference RDU → GPU → CPU) and certified.
DeviceClass = Literal["cpu", "gpu", "rdu"]
DEVICE_CLASSES: Final[tuple[DeviceClass, ...]] = get_args(DeviceClass)
DEFAULT_DEVICE_PREFERENCE: Final[tuple[DeviceClass, ...]] = ("rdu", "gpu", "cpu")

# What a request log keeps: `full` (metadata and sealed content), `metadata`, `zero`; in
# order of strictness (the stricter of an org's mode and a node's floor applies).
LoggingMode = Literal["full", "metadata", "zero"]
LOGGING_MODES: Final[tuple[LoggingMode, ...]] = get_args(LoggingMode)

# Who a user is in the RBAC matrix (`policy.py`). Org roles act in one org; the system
# roles in every org. The auditors (`org_auditor` for one org, `auditor` for every org) read
# usage, audit evidence and sealed content and change nothing. An invitation grants an org
# role, or (from a system admin, naming no org) the fleet-wide `auditor`.
# The `canary` (the synthetic prober, `palisade canary`) and the `monitor` (Prometheus's
# scrape key, `palisade monitor key`) are never invited: the router makes each one's user,
# in an org of its own, itself.
OrgRole = Literal["org_admin", "org_user", "org_auditor"]
FleetAuditor = Literal["auditor"]
SystemRole = Literal["system_admin", FleetAuditor]
CanaryRole = Literal["canary"]
MonitorRole = Literal["monitor"]
UserRole = Literal[SystemRole, OrgRole, CanaryRole, MonitorRole]
InvitedRole = Literal[OrgRole, FleetAuditor]
USER_ROLES: Final[tuple[UserRole, ...]] = get_args(UserRole)
ORG_ROLES: Final[tuple[OrgRole, ...]] = get_args(OrgRole)

# Who holds a fleet certificate (and announces itself by zeroconf).
FleetRole = Literal["node", "router"]
FLEET_ROLES: Final[tuple[FleetRole, ...]] = get_args(FleetRole)
# Every role a fleet certificate may name: the members, and a `monitor` (a Prometheus
# scraping nodes directly), which only completes a TLS handshake: no fleet route takes it.
CertificateRole = Literal[FleetRole, MonitorRole]
CERTIFICATE_ROLES: Final[tuple[CertificateRole, ...]] = get_args(CertificateRole)

# The receipt every inference answer carries: where it ran.
REGION_HEADER: Final = "X-Palisade-Region"
NODE_HEADER: Final = "X-Palisade-Node"
DEVICE_HEADER: Final = "X-Palisade-Device"
MODEL_VERSION_HEADER: Final = "X-Palisade-Model-Version"
# A request pinned to one device class instead of the router's order of preference: only
# for roles the RBAC matrix lets `pin a request to one device class` (the canary).
DEVICE_CLASS_HEADER: Final = "X-Palisade-Device-Class"


def receipt_headers(
    region: str, node: str, device: str, model_version: str | None = None
) -> dict[str, str]:
    """The receipt headers of one answer (the model's version when the node knows it)."""
    headers = {REGION_HEADER: region, NODE_HEADER: node, DEVICE_HEADER: device}
    if model_version is not None:
        headers[MODEL_VERSION_HEADER] = model_version
    return headers


def device_label(device_class: str, accelerator: str | None) -> str:
    """`X-Palisade-Device`: the device class, and what runs the model on it when that says
    more (`gpu/CUDAExecutionProvider`, `cpu/CPUExecutionProvider`, `gpu/cuda:0`)."""
    if not accelerator or accelerator == device_class:
        return device_class
    return f"{device_class}/{accelerator}"
