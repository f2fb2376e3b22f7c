"""A node's signing identity: an Ed25519 key kept 0600 under $PALISADE_HOME."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation._private.errors import ConfigError
from federation._private.private_files import write_private

KEY_FILE = "node.key"


class NodeIdentity:
    """Signs checkpoints and exports; the public half is what auditors trust."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def load_or_create(cls, home: Path) -> NodeIdentity:
        path = home / KEY_FILE
        if path.exists():
            return cls(_read_key(path))
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)
        return cls(key)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The key itself: it is also the node's TLS key and signs its certificate requests."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"NodeIdentity(public_key={self.public_key.hex()})"


def _read_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM Ed25519 private key: {exc}.") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; Palisade node keys are Ed25519.")
    return key


def signature_valid(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` over `data` was made by the Ed25519 key `public_key` (raw bytes)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
