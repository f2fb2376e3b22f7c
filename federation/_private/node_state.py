"""A node's fleet state on disk: `node.toml` and its credentials under `fleet/`.

`palisade node init` writes node.toml (state "pending"); `palisade node enroll` completes
it (state "enrolled", the pinned CA fingerprint, the router's id and key) and writes the
certificate. The appliance reads the same files when it serves. All private (0600/0700).

    <home>/node.key          the node's Ed25519 key, also its TLS key
    <home>/node.toml         NodeState
    <home>/fleet/ca.pem      the pinned fleet CA
    <home>/fleet/node.pem    the node's certificate
    <home>/fleet/crl.pem     the newest CRL (from enrollment, then policy snapshots)
    <home>/fleet/policy.json the newest signed policy snapshot
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
from cryptography import x509
from msgspec import Struct

from federation._private.decoding import convert_config
from federation._private.errors import ConfigError
from federation._private.fleet_wire import Name
from federation._private.identity import KEY_FILE
from federation._private.pki import PeerIdentity, identity_of, load_pem_certificate
from federation._private.private_files import replace_private
from federation._private.vocabulary import DeviceClass

NODE_FILE = "node.toml"
FLEET_DIR = "fleet"
EnrollmentState = Literal["pending", "enrolled"]


class NodeState(Struct, kw_only=True, forbid_unknown_fields=True):
    """node.toml: who this node says it is, and (once enrolled) whom it trusts."""

    node_id: Name
    region: Name
    device_class: DeviceClass | None = None
    hosts: list[str] = msgspec.field(default_factory=list)
    state: EnrollmentState = "pending"
    fleet_id: str | None = None
    fleet_url: str | None = None
    ca_fingerprint: str | None = None
    router_id: str | None = None
    router_public_key: str | None = None

    @classmethod
    def load(cls, home: Path) -> NodeState | None:
        """node.toml under `home`, or None if the node was never initialised."""
        path = home / NODE_FILE
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
        return convert_config(data, cls, source=str(path))

    def save(self, home: Path) -> None:
        """Write node.toml whole or not at all (a crash leaves the previous one)."""
        replace_private(home / NODE_FILE, self.to_toml().encode("utf-8"))

    def to_toml(self) -> str:
        lines = ["# Written by `palisade node init` / `palisade node enroll`."]
        for name, value in msgspec.structs.asdict(self).items():
            if value is None:
                continue
            # A JSON string or list of strings is also a valid TOML value.
            lines.append(f"{name} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class NodeCredentials:
    """Where a node keeps its key and fleet files, and whether it is enrolled."""

    home: Path
    state: NodeState | None

    @classmethod
    def load(cls, home: Path) -> NodeCredentials:
        return cls(home=home, state=NodeState.load(home))

    @property
    def key_path(self) -> Path:
        return self.home / KEY_FILE

    @property
    def fleet_dir(self) -> Path:
        return self.home / FLEET_DIR

    @property
    def cert_path(self) -> Path:
        return self.fleet_dir / "node.pem"

    @property
    def ca_path(self) -> Path:
        return self.fleet_dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.fleet_dir / "crl.pem"

    @property
    def policy_path(self) -> Path:
        return self.fleet_dir / "policy.json"

    @property
    def enrolled(self) -> bool:
        return (
            self.state is not None
            and self.state.state == "enrolled"
            and self.cert_path.exists()
            and self.ca_path.exists()
        )

    def certificate(self) -> x509.Certificate:
        try:
            return load_pem_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.cert_path} is not a readable certificate ({exc}); enroll the node "
                "again with `palisade node enroll`."
            ) from exc

    def identity(self) -> PeerIdentity:
        """What the node's certificate says it is (the fleet trusts this, not node.toml)."""
        return identity_of(self.certificate())
