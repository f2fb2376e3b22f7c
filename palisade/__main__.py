"""`palisade` / `python -m palisade`."""

from __future__ import annotations

import typer

from appliance import appliance_cli, models_cli

app = typer.Typer(
    name="palisade",
    help="Palisade: sovereign inference on region-locked edge appliances.",
    no_args_is_help=True,
)
app.add_typer(appliance_cli, name="appliance")
app.add_typer(models_cli, name="models")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
