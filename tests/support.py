"""Real appliance processes for tests and benchmarks: ephemeral ports, readiness polling."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")
T = TypeVar("T")


def default_model_path() -> Path:
    """The default model fetched by `make test` (PALISADE_HOME or ./var)."""
    # The appliance package is imported when asked for: stand-in processes (tests.standin)
    # import this module, and it would add most of a second to each of their starts.
    from appliance import DEFAULT_MODEL_FILE  # noqa: PLC0415

    home = Path(os.environ.get("PALISADE_HOME", REPO / "var"))
    path = home / "models" / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make model` first")
    return path


def wait_for(
    condition: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.02
) -> T:
    """Poll `condition` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def model_toml(**overrides: object) -> str:
    from appliance import DEFAULT_MODEL_ID  # noqa: PLC0415 - as in default_model_path

    fields: dict[str, object] = {
        "id": DEFAULT_MODEL_ID,
        "path": str(default_model_path()),
        "context_length": 2048,
    }
    fields.update(overrides)
    return "[[models]]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in fields.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


@dataclass
class Server:
    """A Palisade server process (appliance or router) with its captured output."""

    process: subprocess.Popen[str]
    url: str
    home: Path
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    # What checks its certificate when it serves HTTPS (an enrolled node: the fleet CA).
    verify: ssl.SSLContext | bool = True

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one Prometheus sample (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10, verify=self.verify).text
        want = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            metric_name, _, label_text = sample.partition("{")
            if metric_name != name:
                continue
            have = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if all(part in have.split(",") for part in want.split(",") if part):
                return float(value)
        return 0.0

    def log_text(self) -> str:
        return "".join(self.output)

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_for(lambda: _ready(self), timeout=timeout)

    def stop(self) -> None:
        """SIGTERM (SIGCONT first, in case a test stopped it), then reap the output reader."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        stop(self.process)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


Appliance = Server


def start_server(
    kind: str,
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    start_timeout: float = 60.0,
) -> Server:
    """Start `palisade <kind> serve --port 0 …` (a router also `--fleet-port 0`) and wait
    until it prints its URL.

    The caller waits for readiness (`Server.wait_ready`) and stops it (`Server.stop`), so
    several servers can start at once.
    """
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "palisade", kind, "serve", "--port", "0", *args]
    if kind == "router":
        command[7:7] = ["--fleet-port", "0"]  # its fleet listener too (default 8301)
    environment = os.environ | {"PALISADE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment | (env or {}),
        cwd=REPO,
    )
    output: list[str] = []
    url_found = threading.Event()
    url_box: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not url_box and (match := _LISTENING.search(line)):
                url_box.append(match["url"])
                url_found.set()
        url_found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    url_found.wait(start_timeout)
    if not url_box:
        stop(process)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        raise RuntimeError(f"{kind} did not start:\n" + "".join(output))
    return Server(process, url_box[0], home, output, reader)


def write_config(home: Path, config_text: str, name: str = "appliance.toml") -> list[str]:
    """Write a config file into `home`; returns the `--config` arguments for it."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / name
    config.write_text(config_text)
    return ["--config", str(config)]


@contextmanager
def run_appliance(
    home: Path,
    config_text: str | None = None,
    *args: str,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
) -> Iterator[Server]:
    """Start `palisade appliance serve --port 0`, wait for /readyz, stop it with SIGTERM."""
    config = write_config(home, config_text) if config_text is not None else []
    appliance = start_server("appliance", home, *config, *args, env=env)
    try:
        appliance.wait_ready(ready_timeout)
        yield appliance
    finally:
        appliance.stop()


def _ready(server: Server) -> bool:
    if server.process.poll() is not None:
        raise RuntimeError("server exited:\n" + server.log_text())
    try:
        return httpx.get(f"{server.url}/readyz", timeout=2, verify=server.verify).status_code == 200
    except httpx.TransportError:
        return False


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def run_palisade(
    *args: str,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the `palisade` CLI as a user would (a real process); it never ends in a traceback.

    `env` entries are laid over this process's environment, without the `unset` names; a
    wide COLUMNS keeps help and tables on one line each.
    """
    base = {name: value for name, value in os.environ.items() if name not in unset}
    result = subprocess.run(
        [sys.executable, "-m", "palisade", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**base, "COLUMNS": "200", **(env or {})},
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result
