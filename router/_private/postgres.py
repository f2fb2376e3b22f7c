"""A private PostgreSQL cluster in one directory: initdb, pg_ctl, databases and their URLs.

`palisade fleet up --database postgresql` keeps one under PALISADE_HOME for its routers'
tenancy store; the tests start one as a fixture (tests/postgres.py). The layout:

    <directory>/               0700, the caller's
    ├── cluster.json           0600  port and superuser name; written last, so it marks a
    │                                cluster whose initdb finished
    ├── superuser.password     0600  the superuser's password (initdb --pwfile)
    ├── <db>.password          0600  the password of the role that owns database <db>
    ├── postgres.log           0600  initdb's, pg_ctl's and the server's output
    └── data/                  0700  PGDATA, the server's; its Unix socket is inside

The server listens on 127.0.0.1 only, every connection (TCP or the socket) authenticates
with SCRAM-SHA-256, fsync is on. `create_database(name)` makes a database owned by a role
of the same name (LOGIN, not a superuser) and returns its URL: the routers never hold the
superuser's password. Passwords reach the server only as SCRAM verifiers, never in a
command line, and a failed statement is not logged (it could name a verifier).

initdb and postgres refuse to run as root. When Palisade runs as root, they run as Debian's
`postgres` user, which owns `data/`. PALISADE_HOME and the cluster directory stay root's
and 0700 (the router makes its home private again on every start), so those processes get
one capability, CAP_DAC_READ_SEARCH, to walk down to `data/` and read initdb's password
file; nothing else, and no new privileges. Only this module holds the superuser's password,
the one role that could use that capability from SQL (`pg_read_file`).

Which processes belong to the cluster is told by their working directory: the postmaster
and every backend run in `data/`. So `stop()` finds the backends a SIGKILLed postmaster
left behind, and `start()` after such a crash ends them before starting again; PostgreSQL
then replays its WAL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from federation import PalisadeError, private_dir, private_file, write_private
from router._private.monitoring import free_port

HOST = "127.0.0.1"
DATA_DIR = "data"
LOG_FILE = "postgres.log"
STATE_FILE = "cluster.json"
SUPERUSER = "palisade_admin"
SUPERUSER_PASSWORD_FILE = "superuser.password"  # noqa: S105 - a file name
SERVER_USER = "postgres"  # Debian's, made by the postgresql package
DEBIAN_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
ORPHAN_GRACE_S = 5.0
SCRAM_ITERATIONS = 4096
# A database name is also its owner's role name and a file name: plain identifiers only.
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RESERVED = frozenset({SUPERUSER, SERVER_USER, "template0", "template1", "public"})
_SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path, less its NUL
_LOG_TAIL_LINES = 20


class PostgresError(PalisadeError):
    """PostgreSQL is missing, or a cluster could not be made, started or stopped."""


class PostgresCluster:
    """A PostgreSQL cluster of Palisade's own in `directory` (see the module docstring).

    `port` is used by `init()`; an initialised cluster keeps the port it was made with.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.data_dir = directory / DATA_DIR
        self.log_file = directory / LOG_FILE
        self._requested_port = port

    @property
    def initialised(self) -> bool:
        return (self.directory / STATE_FILE).is_file()

    @property
    def port(self) -> int:
        port = self._state()["port"]
        if not isinstance(port, int):
            raise PostgresError(f"{self.directory / STATE_FILE} names no port.")
        return port

    def init(self) -> None:
        """initdb and Palisade's settings; nothing when the cluster is already initialised."""
        if self.initialised:
            return
        private_dir(self.directory)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PostgresError(
                f"{self.data_dir} is not empty but {self.directory / STATE_FILE} is missing: "
                "an earlier initdb did not finish. Remove the data directory to start over."
            )
        port = self._requested_port or free_port(HOST)
        password_file = self.directory / SUPERUSER_PASSWORD_FILE
        write_private(password_file, secrets.token_urlsafe(32))
        self._make_data_dir()
        self._run(self._initdb_args(password_file), "initdb")
        self._append_settings(port)
        _write_over(self.data_dir / "pg_hba.conf", _HBA)
        write_private(
            self.directory / STATE_FILE, json.dumps({"port": port, "superuser": SUPERUSER})
        )

    def start(self) -> None:
        """Start the server (after ending what a killed one left) and wait until it is ready."""
        self._require_initialised()
        if self.postmaster_pid() is not None:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            return
        self._end_leftovers()
        args = ["start", "-D", str(self.data_dir), "-w", "-t", f"{START_TIMEOUT_S:.0f}", "-s"]
        self._run(self._pg_ctl(*args), "pg_ctl start")
        self._wait_ready(time.monotonic() + START_TIMEOUT_S)

    def stop(self) -> None:
        """A fast shutdown (sessions are ended, nothing is lost), or the end of the backends a
        killed postmaster left; either way no process runs in the data directory after."""
        if not self.data_dir.is_dir():
            return
        if self.postmaster_pid() is not None:
            args = ["stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-s"]
            # It may die between the look and pg_ctl: what is left is ended just below.
            self._run(
                self._pg_ctl(*args, "-t", f"{STOP_TIMEOUT_S:.0f}"), "pg_ctl stop", check=False
            )
        self._end_leftovers()

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Database `name` owned by the role `name` (made if missing); its URL."""
        _check_name(name)
        self._require_initialised()
        password_file = self.directory / f"{name}.password"
        if not password_file.is_file():
            write_private(password_file, secrets.token_urlsafe(32))
        verifier = scram_verifier(password_file.read_text().strip())
        self._psql(_create_database_sql(name, verifier))
        return self.url(name)

    def url(self, name: str) -> str:
        """postgresql://<name>:<password>@127.0.0.1:<port>/<name> for a created database."""
        _check_name(name)
        try:
            password = (self.directory / f"{name}.password").read_text().strip()
        except FileNotFoundError:
            raise PostgresError(
                f"database `{name}` was not created in {self.directory}: call create_database"
            ) from None
        return f"postgresql://{name}:{quote(password, safe='')}@{HOST}:{self.port}/{name}"

    def postmaster_pid(self) -> int | None:
        """The running postmaster's process id: the one postmaster.pid names, if it runs here."""
        lines = _read_lines(self.data_dir / "postmaster.pid")
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        return pid if pid in self.processes() else None

    def processes(self) -> set[int]:
        """Every `postgres` process whose working directory is the data directory: the
        postmaster and its backends (orphans too, after the postmaster was killed); not,
        say, a shell someone left in there."""
        data = str(self.data_dir.resolve())
        server = str(_binary("postgres").resolve())
        found: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd, exe = os.readlink(entry / "cwd"), os.readlink(entry / "exe")
            except OSError:  # gone, or not ours to look at
                continue
            # An upgraded package leaves a running server's binary "(deleted)".
            if cwd == data and exe.removesuffix(" (deleted)") == server:
                found.add(int(entry.name))
        return found

    # --- initdb and settings -------------------------------------------------------------

    def _make_data_dir(self) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            user = _server_user()
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)

    def _initdb_args(self, password_file: Path) -> list[str]:
        return [
            str(_binary("initdb")),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--data-checksums",
            "--no-instructions",
        ]  # fmt: skip

    def _append_settings(self, port: int) -> None:
        socket_dir = str(self.data_dir.resolve())
        if len(socket_dir) + len(f"/.s.PGSQL.{port}") > _SOCKET_PATH_MAX:
            socket_dir = ""  # too deep for a Unix socket: TCP on 127.0.0.1 alone
        settings = {
            "listen_addresses": _quoted(HOST),
            "port": str(port),
            "unix_socket_directories": _quoted(socket_dir),
            "unix_socket_permissions": "0700",
            "password_encryption": "scram-sha-256",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            # A failed statement is not logged: it could be an ALTER ROLE with a verifier.
            "log_min_error_statement": "panic",
        }
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# Palisade (router/_private/postgres.py)\n" + lines)

    # --- processes -----------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> list[str]:
        # No -l: the server writes to pg_ctl's output, our log file, opened here; so it
        # needs no access to the cluster directory for its log.
        return [str(_binary("pg_ctl")), *args]

    def _run(self, args: list[str], what: str, *, check: bool = True) -> None:
        private_file(self.log_file)
        with self.log_file.open("ab") as log:
            done = subprocess.run(  # noqa: S603 - PostgreSQL's own programs, arguments built here
                _as_server(args), stdout=log, stderr=subprocess.STDOUT, env=_environment(),
                cwd="/", check=False,
            )  # fmt: skip
        if check and done.returncode != 0:
            raise PostgresError(
                f"{what} failed (exit {done.returncode}); the end of {self.log_file}:\n"
                + self._log_tail()
            )

    def _wait_ready(self, deadline: float) -> None:
        while not self._accepting():
            if self.postmaster_pid() is None:
                raise PostgresError(
                    f"PostgreSQL stopped while starting; the end of {self.log_file}:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"PostgreSQL was not ready within {START_TIMEOUT_S:.0f} s; the end of "
                    f"{self.log_file}:\n" + self._log_tail()
                )
            time.sleep(0.05)

    def _accepting(self) -> bool:
        """postmaster.pid says `ready` (recovery done, listening) and the port answers."""
        lines = _read_lines(self.data_dir / "postmaster.pid")
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _end_leftovers(self) -> None:
        """End the processes still in the data directory (a killed postmaster's backends
        exit on their own when they notice; SIGKILL after a grace), then its stale locks."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while left := self.processes():
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL processes {sorted(left)} did not exit.")
            time.sleep(0.05)
        # Nothing runs here now; a reused process id in a stale lock would stop the start.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        if self.initialised:
            (self.data_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    # --- SQL -----------------------------------------------------------------------------

    def _psql(self, sql: str) -> None:
        """Run `sql` as the superuser over TCP; the statements go through stdin, the
        password through the environment (neither shows in a process list)."""
        password = (self.directory / SUPERUSER_PASSWORD_FILE).read_text().strip()
        args = [
            str(_binary("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres", "-f", "-",
        ]  # fmt: skip
        done = subprocess.run(  # noqa: S603 - psql, arguments built here
            args, input=sql, text=True, capture_output=True, check=False,
            env=_environment() | {"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
        )  # fmt: skip
        if done.returncode != 0:
            raise PostgresError(f"psql failed (exit {done.returncode}): {done.stderr.strip()}")

    # --- state ---------------------------------------------------------------------------

    def _state(self) -> dict[str, object]:
        path = self.directory / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise PostgresError(
                f"no PostgreSQL cluster in {self.directory}: call init() first"
            ) from None
        except (OSError, ValueError) as exc:
            raise PostgresError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(state, dict):
            raise PostgresError(f"{path} is not a JSON object.")
        return state

    def _require_initialised(self) -> None:
        self._state()

    def _log_tail(self) -> str:
        return "\n".join(_read_lines(self.log_file)[-_LOG_TAIL_LINES:])


_HBA = (
    "# Written by Palisade: SCRAM-SHA-256 for every connection, TCP from 127.0.0.1 alone.\n"
    "local  all  all                 scram-sha-256\n"
    "host   all  all  127.0.0.1/32   scram-sha-256\n"
)


def _create_database_sql(name: str, verifier: str) -> str:
    # `name` matched _NAME and the verifier is base64 and `$:`: neither can leave its quotes.
    return f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
    CREATE ROLE "{name}";
  END IF;
END $$;
ALTER ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
  PASSWORD '{verifier}';
SELECT 'CREATE DATABASE "{name}" OWNER "{name}"'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{name}')\\gexec
REVOKE ALL ON DATABASE "{name}" FROM PUBLIC;
"""  # noqa: S608


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, 7677)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def server_bin_dir(debian_root: Path = DEBIAN_ROOT) -> Path:
    """Where initdb, pg_ctl and postgres are: Debian keeps them off PATH, in
    /usr/lib/postgresql/<version>/bin (the newest is used); elsewhere, PATH."""
    installed = sorted(debian_root.glob("*/bin/initdb"), key=_major_version, reverse=True)
    if installed:
        return installed[0].parent
    if found := shutil.which("initdb"):
        return Path(found).parent
    raise PostgresError(
        "PostgreSQL is not installed: run `make system-deps` (Debian's postgresql package)."
    )


def _binary(name: str) -> Path:
    path = server_bin_dir() / name
    if path.is_file():
        return path
    if found := shutil.which(name):
        return Path(found)
    raise PostgresError(f"PostgreSQL's `{name}` is missing: run `make system-deps`.")


def _major_version(initdb: Path) -> tuple[int, ...]:
    version = initdb.parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _as_server(args: list[str]) -> list[str]:
    """`args` as the user the server runs as: ourselves, or Debian's `postgres` when we are
    root (see the module docstring for the one capability it keeps)."""
    if os.geteuid() != 0:
        return args
    _server_user()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresError("`setpriv` (util-linux) is missing; it runs PostgreSQL as root's.")
    return [
        setpriv,
        f"--reuid={SERVER_USER}",
        f"--regid={SERVER_USER}",
        "--init-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--no-new-privs",
        "--",
        *args,
    ]


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root and there is no `{SERVER_USER}` user to run "
            "it as: run `make system-deps` (Debian's postgresql package makes it)."
        ) from None


def _environment() -> dict[str, str]:
    """What PostgreSQL's programs get: a path and a locale, none of our secrets."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in _RESERVED or name.startswith("pg_"):
        raise PostgresError(
            f"database name {name!r}: use lowercase letters, digits and '_' (at most 63, "
            f"not starting with a digit or pg_, not one of {', '.join(sorted(_RESERVED))})."
        )


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _write_over(path: Path, text: str) -> None:
    """Rewrite a file in place, so it keeps its owner (the server's user) and its mode."""
    with path.open("w") as file:
        file.write(text)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
