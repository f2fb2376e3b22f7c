"""API keys: `pal-sk-<id>-<secret>`, shown once, stored only as a hash, compared in constant time.

The secret is 256 random bits, so a single SHA-256 is enough to make a stolen database
useless for calling the API (a slow password hash protects low-entropy secrets only).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "pal-sk-"
_KEY = re.compile(r"^pal-sk-(?P<id>[a-z0-9]{12})-(?P<secret>[A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print the secret, even in a traceback
        return f"ParsedKey(key_id={self.key_id!r}, secret=<hidden>)"


def new_key() -> tuple[str, str, bytes]:
    """A fresh key: (full key to show once, public id, secret hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}{key_id}-{secret}", key_id, hash_secret(secret)


def parse_key(text: str) -> ParsedKey | None:
    match = _KEY.match(text)
    return ParsedKey(match["id"], match["secret"]) if match else None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_token() -> tuple[str, bytes]:
    """A one-time invite token and the hash to store."""
    token = "pal-inv-" + secrets.token_urlsafe(24)
    return token, hash_secret(token)
