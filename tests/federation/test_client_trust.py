"""The `palisade` client commands trust the fleet CA of their PALISADE_HOME (the router of
`fleet up` serves HTTPS with a certificate from it), besides the public CAs."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from federation.client import trusted_cas
from router._private.ca import FleetCA


def test_the_fleet_ca_of_palisade_home_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PALISADE_HOME", str(tmp_path))
    public = len(trusted_cas().get_ca_certs())
    ca = FleetCA.load_or_create(tmp_path)
    trusted = trusted_cas().get_ca_certs()
    assert len(trusted) == public + 1
    assert any(ca.fleet_id in str(cert.get("subject")) for cert in trusted)


def test_an_unreadable_fleet_ca_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PALISADE_HOME", str(tmp_path))
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(typer.Exit):
        trusted_cas()
    assert f"cannot use the fleet CA {tmp_path / 'fleet' / 'ca.pem'}" in capsys.readouterr().err
