"""`palisade image …`: bundles, disks and slots, the on-device agent (one module per room)."""

from __future__ import annotations

import typer

from images._private import cli_agent, cli_bundle, cli_disk

image_cli = typer.Typer(
    help="Build, verify and flash signed appliance images; A/B slots with rollback.",
    no_args_is_help=True,
)
cli_bundle.register(image_cli)
cli_disk.register(image_cli)
cli_agent.register(image_cli)
