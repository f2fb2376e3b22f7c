"""`palisade alerts tail`: a real process receiving an Alertmanager webhook post."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from router._private.monitoring import free_port
from tests.support import REPO, wait_for

ALERT = {
    "status": "firing",
    "labels": {"alertname": "PalisadeNodeDown", "region": "eu-west", "node": "eu-1"},
    "annotations": {"summary": "Node eu-1 (eu-west) is down"},
}


def _post(port: int) -> bool:
    try:
        body = {"version": "4", "status": "firing", "alerts": [ALERT]}
        return httpx.post(f"http://127.0.0.1:{port}/", json=body, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(*flags: str) -> str:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "palisade", "alerts", "tail", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        wait_for(lambda: _post(port), timeout=30, interval=0.1)
        assert httpx.post(f"http://127.0.0.1:{port}/", content=b"{", timeout=2).status_code == 400
        assert process.stdout is not None
        return process.stdout.readline()
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_each_alert_is_one_line() -> None:
    line = _tail()
    assert line == (
        "firing PalisadeNodeDown node=eu-1 region=eu-west: Node eu-1 (eu-west) is down\n"
    )


def test_json_prints_the_alert_as_received() -> None:
    assert json.loads(_tail("--json")) == ALERT
