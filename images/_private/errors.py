"""The one error family of `images`: every refusal has its own stable `code`."""

from __future__ import annotations

from federation import PalisadeError


class ImageError(PalisadeError):
    """A bundle, disk or boot state that Palisade refuses; `code` names which check failed."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"
