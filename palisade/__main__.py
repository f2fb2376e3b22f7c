"""`palisade` / `python -m palisade`."""

from __future__ import annotations

import typer

from appliance import appliance_cli, models_cli
from compliance import audit_cli
from federation import budget_cli, key_cli, limits_cli, org_cli, usage_cli, user_cli
from images import image_cli, register_fleet
from provisioning import node_cli
from router import fleet_cli, router_cli

app = typer.Typer(
    name="palisade",
    help="Palisade: sovereign inference on region-locked edge appliances.",
    no_args_is_help=True,
)
app.add_typer(appliance_cli, name="appliance")
app.add_typer(models_cli, name="models")
app.add_typer(router_cli, name="router")
register_fleet(fleet_cli)
app.add_typer(fleet_cli, name="fleet")
app.add_typer(node_cli, name="node")
app.add_typer(image_cli, name="image")
app.add_typer(org_cli, name="org")
app.add_typer(user_cli, name="user")
app.add_typer(key_cli, name="key")
app.add_typer(budget_cli, name="budget")
app.add_typer(limits_cli, name="limits")
app.add_typer(usage_cli, name="usage")
app.add_typer(audit_cli, name="audit")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
