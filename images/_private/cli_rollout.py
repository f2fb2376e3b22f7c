"""`palisade fleet update`: hand a bundle to the router for a rollout (registered onto the
router's `fleet` command group by palisade/__main__.py)."""

from __future__ import annotations

import typer


def register_fleet(app: typer.Typer) -> None:
    """Add `update` to the `palisade fleet` group `app`."""
