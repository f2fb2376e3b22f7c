"""promtool and amtool accept the shipped rules and the generated configs, and every shipped
alert rule is shown firing and not firing by promtool's unit tests (ops/prometheus/tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from router._private.monitoring import RULES, Monitoring, write_configs

RULE_TESTS = sorted((RULES.parent / "tests").glob("*.yml"))

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("amtool") is None,
    reason="promtool/amtool are absent: run `make system-deps` (Debian's prometheus, "
    "prometheus-alertmanager)",
)


def _check(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_shipped_rules() -> None:
    out = _check("promtool", "check", "rules", str(RULES))
    assert "SUCCESS: 10 rules found" in out


def test_promtool_and_amtool_check_the_generated_configs(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "sd.key").write_text("pal-sk-x")
    setup = Monitoring(
        router_url="https://127.0.0.1:8300",
        ca_file=tmp_path / "ca.pem",
        credentials_file=tmp_path / "sd.key",
        webhook_url="http://127.0.0.1:9095/",
        alertmanager_address="127.0.0.1:9093",
    )
    directory = write_configs(tmp_path / "monitoring", setup)
    out = _check("promtool", "check", "config", str(directory / "prometheus.yml"))
    assert "SUCCESS: 10 rules found" in out
    _check("amtool", "check-config", str(directory / "alertmanager.yml"))


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    assert RULE_TESTS
    out = _check("promtool", "test", "rules", *map(str, RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS), out


def test_every_alert_rule_has_a_firing_and_a_quiet_case() -> None:
    """A rule added to rules.yml without a unit test in ops/prometheus/tests fails here."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        suite = yaml.safe_load(path.read_text())
        assert suite["rule_files"] == ["../rules.yml"], path
        for case in suite["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert len(alerts) == 10
    assert alerts - firing == set(), "rules without a firing case"
    assert alerts - quiet == set(), "rules without a case where they stay quiet"
    assert (firing | quiet) <= alerts, "tests of rules that no longer exist"
