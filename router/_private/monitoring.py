"""Prometheus and Alertmanager for a fleet: their generated configs and their processes.

Prometheus (Debian's `prometheus`) finds what to scrape from the router's HTTP service
discovery endpoint (`prometheus_routes.SD_PATH`, with a monitor key and the fleet CA), and
evaluates the shipped rules (ops/prometheus/rules.yml); Alertmanager (Debian's
`prometheus-alertmanager`) sends every alert to one webhook, such as `palisade alerts tail`.
The configs are plain data written as JSON, which is YAML: `promtool check config` and
`amtool check-config` read them as they are.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation import PalisadeError, private_dir, private_file, write_private
from router._private.prometheus_routes import SD_PATH

RULES = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "rules.yml"
PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"


class MonitoringError(PalisadeError):
    """Prometheus or Alertmanager is missing or did not start."""


@dataclass(frozen=True)
class Monitoring:
    """Where the router is, how Prometheus may ask it, and where alerts go."""

    router_url: str  # the router's public URL (https://…)
    ca_file: Path  # the fleet CA: the router's and the nodes' certificates
    credentials_file: Path  # a monitor key: it may read the scrape targets and node metrics
    webhook_url: str  # where Alertmanager posts alerts
    alertmanager_address: str  # host:port Prometheus sends alerts to
    scrape_interval_s: float = 15.0
    evaluation_interval_s: float = 15.0
    rules_file: Path = RULES


def _seconds(value: float) -> str:
    return f"{round(value * 1000)}ms"


def prometheus_config(setup: Monitoring) -> dict[str, Any]:
    tls = {"ca_file": str(setup.ca_file)}
    # `type` spelled out: Prometheus 2.42 sends the bare credentials without it.
    auth = {"type": "Bearer", "credentials_file": str(setup.credentials_file)}
    return {
        "global": {
            "scrape_interval": _seconds(setup.scrape_interval_s),
            "evaluation_interval": _seconds(setup.evaluation_interval_s),
        },
        "rule_files": [str(setup.rules_file)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [setup.alertmanager_address]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "palisade",
                "tls_config": tls,
                "authorization": auth,
                "http_sd_configs": [
                    {
                        "url": setup.router_url.rstrip("/") + SD_PATH,
                        "refresh_interval": _seconds(max(setup.scrape_interval_s, 1.0)),
                        "authorization": auth,
                        "tls_config": tls,
                    }
                ],
            }
        ],
    }


def alertmanager_config(webhook_url: str, *, group_wait_s: float = 10.0) -> dict[str, Any]:
    return {
        "route": {
            "receiver": "palisade-webhook",
            "group_by": ["alertname", "region", "node", "org"],
            "group_wait": _seconds(group_wait_s),
            "group_interval": _seconds(max(group_wait_s, 1.0)),
            "repeat_interval": "4h",
        },
        "receivers": [
            {
                "name": "palisade-webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            }
        ],
    }


def write_configs(directory: Path, setup: Monitoring, *, group_wait_s: float = 10.0) -> Path:
    """prometheus.yml and alertmanager.yml in `directory` (private: they name key files)."""
    private_dir(directory)
    write_private(directory / "prometheus.yml", _yaml(prometheus_config(setup)))
    alerts = alertmanager_config(setup.webhook_url, group_wait_s=group_wait_s)
    write_private(directory / "alertmanager.yml", _yaml(alerts))
    return directory


def _yaml(data: dict[str, Any]) -> bytes:
    """YAML as Prometheus reads it: JSON is YAML, and needs no YAML library here."""
    return json.dumps(data, indent=2).encode() + b"\n"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def command(name: str) -> str:
    """The path of Debian's binary `name`, or why it is missing."""
    found = shutil.which(name)
    if found is None:
        raise MonitoringError(
            f"`{name}` is not installed: run `make system-deps` (Debian's prometheus and "
            "prometheus-alertmanager packages)."
        )
    return found


def start_prometheus(directory: Path, address: str, log: Path) -> subprocess.Popen[str]:
    """Prometheus on `address` (host:port) with `directory`/prometheus.yml; data beside it."""
    args = [
        command(PROMETHEUS),
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'prometheus-data'}",
        f"--web.listen-address={address}",
    ]
    return _spawn(args, log)


def start_alertmanager(directory: Path, address: str, log: Path) -> subprocess.Popen[str]:
    """Alertmanager on `address` alone (no cluster peers)."""
    args = [
        command(ALERTMANAGER),
        f"--config.file={directory / 'alertmanager.yml'}",
        f"--storage.path={directory / 'alertmanager-data'}",
        f"--web.listen-address={address}",
        "--cluster.listen-address=",
    ]
    return _spawn(args, log)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[str]:
    private_file(log)  # beside configs naming the key file: owner only
    with log.open("a") as output:
        return subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, text=True)  # noqa: S603
