"""`palisade` / `python -m palisade`.

Each command group lives in its package, and a command imports only its group's package:
`palisade key list` does not load the inference server, the router and the image tools
(about a second of interpreter start on a small machine). Anything else (`palisade`,
`palisade --help`, an unknown word) builds the whole tree.
"""

from __future__ import annotations

import importlib
import sys

import typer

# Group name -> (package, attribute), in the order `palisade --help` lists them.
GROUPS: dict[str, tuple[str, str]] = {
    "appliance": ("appliance", "appliance_cli"),
    "models": ("appliance", "models_cli"),
    "router": ("router", "router_cli"),
    "fleet": ("router", "fleet_cli"),
    "alerts": ("router", "alerts_cli"),
    "canary": ("router", "canary_cli"),
    "monitor": ("router", "monitor_cli"),
    "node": ("provisioning", "node_cli"),
    "image": ("images", "image_cli"),
    "org": ("federation", "org_cli"),
    "user": ("federation", "user_cli"),
    "key": ("federation", "key_cli"),
    "budget": ("federation", "budget_cli"),
    "limits": ("federation", "limits_cli"),
    "usage": ("federation", "usage_cli"),
    "db": ("federation", "db_cli"),
    "audit": ("compliance", "audit_cli"),
}
# The commands the image tools add to the router's `fleet` group (images/_private/cli_rollout.py);
# any other `palisade fleet <command>` does without them.
ROLLOUT_COMMANDS = frozenset({"update", "updates"})


def _load(name: str, command: str | None) -> typer.Typer:
    package, attribute = GROUPS[name]
    group: typer.Typer = getattr(importlib.import_module(package), attribute)
    if name == "fleet" and (command is None or command in ROLLOUT_COMMANDS):
        importlib.import_module("images").register_fleet(group)
    return group


def build_app(only: str | None = None, command: str | None = None) -> typer.Typer:
    """The `palisade` command with every group, or with the group `only` alone (enough of it
    to run `command`, when that is known)."""
    app = typer.Typer(
        name="palisade",
        help="Palisade: sovereign inference on region-locked edge appliances.",
        no_args_is_help=True,
    )
    for name in GROUPS:
        if only is None or name == only:
            app.add_typer(_load(name, command if only else None), name=name)
    return app


def main() -> None:
    words = sys.argv[1:3]
    group = words[0] if words and words[0] in GROUPS else None
    command = words[1] if group and len(words) > 1 and not words[1].startswith("-") else None
    build_app(group, command)()


if __name__ == "__main__":
    main()
