"""`palisade fleet up` (what `make run` starts): a router and two regions that answer curl."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.support import REPO, default_model_path, wait_for

_CURL = re.compile(r"^\s*(curl -s .*Authorization: Bearer pal-sk-.*)$", re.MULTILINE)
_URL = re.compile(r"export PALISADE_URL=(?P<url>\S+)")


def test_fleet_up_serves_the_printed_curl_from_both_regions_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    (tmp_path / "models").symlink_to(default_model_path().parent, target_is_directory=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "palisade", "fleet", "up", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=os.environ | {"PALISADE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        output.extend(process.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        curl = wait_for(lambda: _CURL.search("".join(output)), timeout=180)
        url = _URL.search("".join(output))
        assert url is not None
        result = subprocess.run(
            [*shlex.split(curl[1]), "-D", "-"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0
        assert '"object":"chat.completion"' in result.stdout
        receipt = re.search(r"x-palisade-region: (\S+)", result.stdout)
        assert receipt is not None
        assert receipt[1] in {"eu-west", "us-east"}
        demo_key = (tmp_path / "demo.key").read_text().strip()
        for region in ("eu-west", "us-east"):  # both regions serve the default model
            pinned = httpx.post(
                f"{url['url']}/v1/completions",
                json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1},
                headers={"Authorization": f"Bearer {demo_key}", "X-Palisade-Regions": region},
                timeout=60,
            )
            assert pinned.status_code == 200, pinned.text
            assert pinned.headers["x-palisade-node"] == f"{region}-1"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0, "".join(output)
    try:
        httpx.get(f"{url['url']}/healthz", timeout=2)
        raise AssertionError("the router still answers after fleet up stopped")
    except httpx.TransportError:
        pass
