"""Request headers read straight from an ASGI scope, for the hot paths."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class ScopeHeaders(Mapping[str, str]):
    """A request's headers read from its ASGI scope one look-up at a time (names in any
    case; the first of repeated ones), for the inference path: Litestar's
    `request.headers` builds a multidict of them all first, about 10 µs a request."""

    __slots__ = ("_raw",)

    def __init__(self, source: Any) -> None:
        scope: Mapping[str, Any] = getattr(source, "scope", source)
        self._raw: list[tuple[bytes, bytes]] = scope["headers"]

    def __getitem__(self, name: str) -> str:
        value: str | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: Any = None) -> Any:  # a miss raises nothing: cheaper
        wanted = name.lower().encode("latin-1")
        for key, value in self._raw:
            if key == wanted:  # servers hand names over lower-cased (ASGI)
                return value.decode("latin-1")
        return default

    def __iter__(self) -> Iterator[str]:
        return (key.decode("latin-1") for key, _ in self._raw)

    def __len__(self) -> int:
        return len(self._raw)
