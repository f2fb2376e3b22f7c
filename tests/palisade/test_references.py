"""The reference pages in docs/ are what the code generates now (`make docs` rewrites them)."""

from __future__ import annotations

from pathlib import Path

from palisade._private.references import (
    PAGES,
    cli_reference,
    configuration_reference,
    stale_pages,
    write_pages,
)


def test_the_committed_reference_pages_match_the_code() -> None:
    assert stale_pages() == [], "run `make docs` and commit docs/"


def test_a_page_edited_by_hand_is_found_and_rewritten(tmp_path: Path) -> None:
    assert sorted(write_pages(tmp_path)) == sorted(PAGES)
    assert stale_pages(tmp_path) == []
    page = tmp_path / "configuration.md"
    page.write_text(page.read_text().replace("`heartbeat_interval_s`", "`heartbeat_s`"))
    assert stale_pages(tmp_path) == ["configuration.md"]
    assert write_pages(tmp_path) == ["configuration.md"]


def test_every_command_and_its_options_are_listed() -> None:
    text = cli_reference()
    for command in ("palisade appliance serve", "palisade key create", "palisade audit export"):
        assert f"## `{command}`" in text
    assert "`--config <path>` | Appliance TOML config file." in text


def test_config_keys_carry_their_bounds_defaults_and_the_comment_above_them() -> None:
    text = configuration_reference()
    row = next(line for line in text.splitlines() if line.startswith("| `missed_beats_down` |"))
    assert "integer, ≥ 1, ≤ 100" in row
    assert "| `3` |" in row
    tls = next(line for line in text.splitlines() if line.startswith("| `tls_cert` |"))
    assert "serves HTTPS with this certificate" in tls
    assert "### Router: `[health]`" in text
    assert "### Appliance: `[fleet]`" in text
