"""One engine server run as a child process: started, watched, restarted, stopped.

`EngineProcess` starts a command (which must serve HTTP on the port it is given) in its
own process group, on a private 127.0.0.1 port, and waits until `GET /health` and then
`GET /v1/models` answer 200; from then on it asks `/health` every 10 s, and three failures
in a row mean a hung engine, which is stopped. Its output goes line by line into the logger
`palisade.engine.<model id>`, at the level the line itself names. When it exits (or was
stopped as hung) it is started again after a back-off (`RestartPolicy`); `ready` is False
meanwhile. `close()` sends SIGTERM to the whole group and SIGKILL after `stop_timeout_s`.
The child also gets
SIGTERM from the kernel if the appliance dies (PR_SET_PDEATHSIG, on Linux), so it never
outlives it. One supervisor thread starts every child and lives exactly as long as its
children: the parent-death signal follows the thread that forked, not the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from appliance._private.errors import ModelLoadError

_PR_SET_PDEATHSIG = 1
_HEALTH_POLL_S = 0.2
_PROBE_TIMEOUT_S = 2.0
_LIVENESS_TIMEOUT_S = 5.0
_TAIL_LINES = 40
_MAX_RETRY_AFTER_S = 60
# A level at the start of a line (after vLLM's "(APIServer pid=12)" prefix), or TRT-LLM's
# "[TRT-LLM] [W]" marker.
_LEVEL_WORD = re.compile(r"^(?:\([^)]*\)\s*)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")
_LEVEL_LETTER = re.compile(r"\[TRT-LLM\]\s*\[([VIWEF])\]")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "V": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
_SECRET_MIN_LENGTH = 6  # shorter env values ("1", "cpu") are not secrets and are everywhere


class RestartPolicy:
    """When to start an engine again, and when it is likely back: `first` seconds after an
    exit, doubling up to `longest`, back to `first` once a run has stayed healthy for
    `reset_after` seconds. Plain numbers in, so it is tested without processes or clocks."""

    def __init__(
        self, first: float = 1.0, longest: float = 30.0, reset_after: float = 60.0
    ) -> None:
        self.first = first
        self.longest = longest
        self.reset_after = reset_after
        self._next = first
        self._restart_at: float | None = None
        self._startup_s = 0.0

    def after_exit(self, healthy_for: float | None, now: float) -> float:
        """The delay before the next start, given how long the run that ended was healthy
        (None: it never became healthy)."""
        if healthy_for is not None and healthy_for >= self.reset_after:
            self._next = self.first
        delay = self._next
        self._next = min(self.longest, delay * 2)
        self._restart_at = now + delay
        return delay

    def healthy(self, startup_s: float) -> None:
        """A start became healthy after `startup_s` seconds."""
        self._startup_s = startup_s
        self._restart_at = None

    def retry_after(self, now: float) -> int:
        """Whole seconds until the engine is likely healthy again: the rest of the back-off
        plus the last start-up's duration (1 to 60)."""
        waiting = 0.0 if self._restart_at is None else max(0.0, self._restart_at - now)
        return max(1, min(_MAX_RETRY_AFTER_S, math.ceil(waiting + self._startup_s)))


@dataclass(frozen=True, slots=True)
class LineLog:
    """Writes an engine's output lines into its logger: at the level the line names (INFO
    when it names none), never with a secret from its environment, and a known shutdown
    complaint (`shutdown_noise`, e.g. vLLM's EngineDeadError) at INFO while stopping."""

    logger: logging.Logger
    secrets: tuple[str, ...] = ()
    shutdown_noise: re.Pattern[str] | None = None

    def write(self, line: str, *, stopping: bool) -> None:
        text = self.scrub(line.rstrip())
        if not text:
            return
        level = line_level(text)
        noise = self.shutdown_noise
        if stopping and level > logging.INFO and noise is not None and noise.search(text):
            level = logging.INFO
        self.logger.log(level, "%s", text)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def line_level(text: str) -> int:
    """The logging level an engine's log line names; INFO when it names none."""
    match = _LEVEL_WORD.match(text) or _LEVEL_LETTER.search(text)
    return _LEVELS[match[1]] if match else logging.INFO


def secrets_of(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values of configured environment variables long enough to be secrets, longest
    first (so a value containing another is replaced whole)."""
    values = {value for value in env.values() if len(value) >= _SECRET_MIN_LENGTH}
    return tuple(sorted(values, key=len, reverse=True))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()  # looked up here: the child only calls it, between fork and exec


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A `preexec_fn` asking the kernel to SIGTERM the child when its parent dies (and
    exiting at once if the parent is already gone); None where that cannot be asked."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class EngineProcess:
    """An engine server supervised as a child process (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], Sequence[str]],
        *,
        env: Mapping[str, str],
        secrets: Iterable[str] = (),
        startup_timeout_s: float,
        stop_timeout_s: float,
        shutdown_noise: re.Pattern[str] | None = None,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        port: int | None = None,
        headers: Mapping[str, str] | None = None,
        liveness_every_s: float = 10.0,
        liveness_failures: int = 3,
    ) -> None:
        self.name = name
        self.port = free_port() if port is None else port
        self.headers = dict(headers or {})  # what the child wants on requests (its key)
        self._command = command
        self._env = dict(env)
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._policy = policy or RestartPolicy()
        # Once healthy, /health is asked this often; this many failures in a row (a hung
        # engine) and it is stopped, and so restarted.
        self._liveness_every_s = liveness_every_s
        self._liveness_failures = liveness_failures
        self._clock = clock
        self._log = logging.getLogger(f"palisade.engine.{name}")
        self._lines = LineLog(self._log, tuple(secrets), shutdown_noise)
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._settled = threading.Event()  # the first start succeeded or failed
        self._failure: str | None = None
        self._supervisor: threading.Thread | None = None
        self._child: subprocess.Popen[str] | None = None
        self._ready = False
        self._started_at = 0.0
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    def retry_after(self) -> int:
        """Seconds until the engine is likely ready again (for 503s while it restarts)."""
        return self._policy.retry_after(self._clock())

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine and block until it is healthy; `ModelLoadError` (with the end
        of its output) when it exits first, is not healthy in time, or is closed."""
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"engine-{self.name}", daemon=True
        )
        self._supervisor.start()
        self._settled.wait()
        if self._failure is not None:
            self.close()
            raise ModelLoadError(self._failure)

    def close(self) -> None:
        """Stop the engine (SIGTERM to its group, SIGKILL after the grace period) and the
        supervisor with it; no restart follows."""
        with self._lock:
            self._stopping.set()
            child = self._child
        if child is not None and child.poll() is None:
            self._log.info("stopping engine %s (pid %d)", self.name, child.pid)
            _signal_group(child.pid, signal.SIGTERM)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self._stop_timeout_s + 5.0)
            if supervisor.is_alive() and child is not None:
                _signal_group(child.pid, signal.SIGKILL)  # a child that never reads SIGTERM
                supervisor.join(5.0)

    # --- the supervisor thread ------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            while not self._stopping.is_set():
                healthy_for = self._run_once()
                if not self._settled.is_set():  # the first start failed: load() reports it
                    self._failure = self._first_failure()
                    self._settled.set()
                    return
                if self._stopping.is_set():
                    return
                delay = self._policy.after_exit(healthy_for, self._clock())
                self._log.warning("engine %s restarts in %.0f s", self.name, delay)
                if self._stopping.wait(delay):
                    return
                self.restarts += 1
        finally:
            self._ready = False
            self._settled.set()

    def _run_once(self) -> float | None:
        """Run the engine once, until it exits or is stopped; how long it was healthy."""
        child = self._spawn()
        if child is None:
            return None
        pump = threading.Thread(target=self._pump, args=(child,), daemon=True)
        pump.start()
        healthy_for: float | None = None
        try:
            if self._wait_healthy(child):
                up_at = self._clock()
                self._ready = True
                self._settled.set()
                self._watch(child)
                healthy_for = self._clock() - up_at
        finally:
            self._ready = False
            self._stop(child)
            pump.join(5.0)
        if not self._stopping.is_set():
            self._log.warning(
                "engine %s (pid %d) exited with %s", self.name, child.pid, _status(child)
            )
        return healthy_for

    def _watch(self, child: subprocess.Popen[str]) -> None:
        """Return when the child exits, or when it has stopped answering /health (hung:
        the caller then stops it)."""
        failures = 0
        timeout = min(_LIVENESS_TIMEOUT_S, self._liveness_every_s)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout) as client:
            while True:
                try:
                    child.wait(self._liveness_every_s)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    return
                if self._stopping.is_set():
                    continue  # close() has signalled it: wait for it to go
                failures = 0 if _answers(client, "/health") else failures + 1
                if failures >= self._liveness_failures:
                    self._log.warning(
                        "engine %s (pid %d) stopped answering /health; restarting it",
                        self.name,
                        child.pid,
                    )
                    return

    def _spawn(self) -> subprocess.Popen[str] | None:
        command = list(self._command(self.port))
        with self._lock:
            if self._stopping.is_set():
                return None
            try:
                child = subprocess.Popen(  # noqa: S603 - the operator's configured engine
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    env=self._env,
                    start_new_session=True,  # its own process group, signalled as one
                    preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509 - prctl only
                )
            except OSError as exc:
                self._failure = (
                    f"The engine for `{self.name}` could not be started ({command[0]}: "
                    f"{exc.strerror or exc}). Install it, or set `command` in the model's "
                    "config to the engine's executable."
                )
                return None
            self._child = child
        self._started_at = self._clock()
        self._log.info(
            "started engine %s: pid %d on 127.0.0.1:%d: %s",
            self.name,
            child.pid,
            self.port,
            self._lines.scrub(" ".join(command)),
        )
        return child

    def _pump(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        with child.stdout:
            for line in child.stdout:
                self._tail.append(self._lines.scrub(line.rstrip()))
                self._lines.write(line, stopping=self._stopping.is_set())

    def _wait_healthy(self, child: subprocess.Popen[str]) -> bool:
        """Poll /health, then /v1/models, until both answer 200; False when the child exits,
        the startup timeout passes, or the engine is being stopped."""
        deadline = self._clock() + self._startup_timeout_s
        paths = ["/health", "/v1/models"]
        with httpx.Client(
            base_url=self.url, headers=self.headers, timeout=_PROBE_TIMEOUT_S
        ) as client:
            while paths:
                if child.poll() is not None or self._stopping.is_set():
                    return False
                if self._clock() > deadline:
                    self._failure = (
                        f"The engine for `{self.name}` was not healthy within "
                        f"{self._startup_timeout_s:g} s (startup_timeout_s); it was stopped. "
                        f"Its last output:\n{self._tail_text()}"
                    )
                    self._log.error("%s", self._failure.partition("\n")[0])
                    return False
                if _answers(client, paths[0]):
                    paths.pop(0)
                    continue
                self._stopping.wait(_HEALTH_POLL_S)
        took = self._clock() - self._started_at
        self._policy.healthy(took)
        self._log.info("engine %s is healthy after %.1f s", self.name, took)
        return True

    def _stop(self, child: subprocess.Popen[str]) -> None:
        """End the child and everything in its process group (SIGTERM, then SIGKILL after
        the grace period), reaped; what it started (vLLM's engine core) shares its group.
        After a crash that group's survivors are orphans: they get the same treatment."""
        deadline = time.monotonic() + self._stop_timeout_s
        if child.poll() is None or not self._stopping.is_set():  # else close() signalled it
            _signal_group(child.pid, signal.SIGTERM)
            _signal_group(child.pid, signal.SIGCONT)  # a stopped process acts on it only so
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._log.warning("engine %s ignored SIGTERM; killing it", self.name)
            _signal_group(child.pid, signal.SIGKILL)
            child.wait()
        # The group's id is not reused while any member lives, so this reaches only them.
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(child.pid, signal.SIGKILL)

    def _first_failure(self) -> str:
        """Why the first start did not make the engine healthy."""
        if self._stopping.is_set():
            return f"The engine for `{self.name}` was stopped while it was starting."
        if self._failure is not None:  # could not be started, or not healthy in time
            return self._failure
        child = self._child
        status = _status(child) if child is not None else "no process"
        return (
            f"The engine for `{self.name}` exited before it was healthy ({status}). Its "
            f"last output:\n{self._tail_text()}"
        )

    def _tail_text(self) -> str:
        return "\n".join(self._tail) or "(nothing)"


def _answers(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(child: subprocess.Popen[str]) -> str:
    code = child.returncode
    if code is None:
        return "still running"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
