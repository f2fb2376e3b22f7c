"""`palisade image …` commands of this room (registered by images/_private/cli.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this room's commands to `app`."""
