"""PostgresCluster for real: initdb, pg_ctl, SCRAM on 127.0.0.1, a restart, a killed postmaster.

The shared session cluster (tests/postgres.py) serves the tests that only read and create;
the tests that restart or SIGKILL a server get a cluster of their own.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from router._private.postgres import PostgresCluster, PostgresError, server_bin_dir
from tests.postgres import postgres_cluster
from tests.support import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A cluster these tests may restart and kill."""
    with postgres_cluster(tmp_path_factory) as cluster:
        yield cluster


def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            return await connection.fetch(query, *args)
        finally:
            await connection.close()

    return asyncio.run(run())


def execute(url: str, statement: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def superuser_url(cluster: PostgresCluster) -> str:
    password = (cluster.directory / "superuser.password").read_text().strip()
    return f"postgresql://palisade_admin:{password}@127.0.0.1:{cluster.port}/postgres"


def test_a_created_database_takes_connections_as_its_own_role(postgres: PostgresCluster) -> None:
    url = postgres.create_database("tenancy")

    assert url.startswith("postgresql://tenancy:")
    assert url.endswith(f"@127.0.0.1:{postgres.port}/tenancy")
    execute(url, "CREATE TABLE orgs (name text PRIMARY KEY); INSERT INTO orgs VALUES ('acme')")
    assert [row["name"] for row in fetch(url, "SELECT name FROM orgs")] == ["acme"]
    [me] = fetch(
        url,
        "SELECT current_user AS who, current_database() AS db, rolsuper, rolcreatedb "
        "FROM pg_roles WHERE rolname = current_user",
    )
    assert (me["who"], me["db"], me["rolsuper"], me["rolcreatedb"]) == (
        "tenancy", "tenancy", False, False,
    )  # fmt: skip


def test_creating_a_database_again_keeps_it_and_its_url(postgres: PostgresCluster) -> None:
    url = postgres.create_database("again")
    execute(url, "CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")

    assert postgres.create_database("again") == url == postgres.url("again")
    assert [row["n"] for row in fetch(url, "SELECT n FROM kept")] == [7]


def test_a_role_may_not_reach_another_roles_database(postgres: PostgresCluster) -> None:
    postgres.create_database("first")
    second = postgres.create_database("second")

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        fetch(second.rsplit("/", 1)[0] + "/first", "SELECT 1")


def test_loopback_scram_and_fsync_are_what_the_server_runs_with(
    postgres: PostgresCluster,
) -> None:
    admin = superuser_url(postgres)
    settings = {
        row["name"]: row["setting"]
        for row in fetch(
            admin,
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["listen_addresses", "fsync", "password_encryption", "unix_socket_directories"],
        )
    }
    rules = fetch(
        admin, "SELECT type, address, auth_method FROM pg_hba_file_rules ORDER BY line_number"
    )

    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["fsync"] == "on"
    assert settings["password_encryption"] == "scram-sha-256"  # noqa: S105 - a method
    assert settings["unix_socket_directories"] == str(postgres.data_dir.resolve())
    assert [(rule["type"], rule["address"], rule["auth_method"]) for rule in rules] == [
        ("local", None, "scram-sha-256"),
        ("host", "127.0.0.1", "scram-sha-256"),
    ]


def test_a_wrong_password_is_refused(postgres: PostgresCluster) -> None:
    url = postgres.create_database("guarded")
    user_and_password, _, rest = url.removeprefix("postgresql://").partition("@")

    with pytest.raises(asyncpg.InvalidPasswordError):
        fetch(f"postgresql://guarded:not-the-password@{rest}", "SELECT 1")
    assert user_and_password.startswith("guarded:")


def test_state_is_private_and_the_data_directory_is_the_servers(
    postgres: PostgresCluster,
) -> None:
    postgres.create_database("private_check")
    directory = postgres.directory

    for path in (directory, postgres.data_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for name in ("superuser.password", "private_check.password", "cluster.json", "postgres.log"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
        assert (directory / name).stat().st_uid == os.geteuid(), name
    server_uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert postgres.data_dir.stat().st_uid == server_uid


def test_an_initialised_cluster_is_found_again(postgres: PostgresCluster) -> None:
    url = postgres.create_database("found")
    state = postgres.directory / "cluster.json"
    before = state.stat().st_mtime_ns

    again = PostgresCluster(postgres.directory, port=1)
    again.init()

    assert again.initialised
    assert again.port == postgres.port
    assert again.url("found") == url
    assert state.stat().st_mtime_ns == before


@pytest.mark.parametrize("name", ["Upper", "1st", "a-b", "x'; DROP TABLE y; --", "pg_x", ""])
def test_a_name_that_is_not_a_plain_identifier_is_refused(
    postgres: PostgresCluster, name: str
) -> None:
    with pytest.raises(PostgresError, match="lowercase letters"):
        postgres.create_database(name)


def test_the_superuser_and_templates_are_not_database_names(postgres: PostgresCluster) -> None:
    for name in ("palisade_admin", "postgres", "template1"):
        with pytest.raises(PostgresError, match="not one of"):
            postgres.create_database(name)


def test_a_restart_keeps_the_data_and_takes_new_connections(own: PostgresCluster) -> None:
    url = own.create_database("restarted")
    execute(url, "CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
    before = own.postmaster_pid()

    own.restart()

    assert own.postmaster_pid() not in (None, before)
    assert [row["n"] for row in fetch(url, "SELECT n FROM t")] == [1]


def test_a_sigkilled_postmaster_is_recovered_by_start(own: PostgresCluster) -> None:
    url = own.create_database("crashed")
    execute(url, "CREATE TABLE t (n int); INSERT INTO t VALUES (42)")
    killed = own.postmaster_pid()
    assert killed is not None

    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: own.postmaster_pid() is None, timeout=10)
    own.start()

    assert own.postmaster_pid() not in (None, killed)
    assert [row["n"] for row in fetch(url, "SELECT n FROM t")] == [42]


def test_stop_ends_what_a_sigkilled_postmaster_left(own: PostgresCluster) -> None:
    url = own.create_database("orphans")

    async def kill_under_a_session() -> tuple[set[int], int]:
        session = await asyncpg.connect(url, timeout=10)
        try:
            running, postmaster = own.processes(), own.postmaster_pid()
            assert postmaster is not None
            os.kill(postmaster, signal.SIGKILL)
            own.stop()
            return running, postmaster
        finally:
            session.terminate()
            await asyncio.sleep(0)  # its transport closes on the loop's next turn

    running, postmaster = asyncio.run(kill_under_a_session())

    assert len(running - {postmaster}) >= 3  # the session's backend and the helpers were left
    assert own.processes() == set()
    assert not (own.data_dir / "postmaster.pid").exists()
    own.start()
    assert fetch(url, "SELECT 1 AS one")[0]["one"] == 1


def test_stop_leaves_other_processes_in_the_data_directory_alone(own: PostgresCluster) -> None:
    bystander = subprocess.Popen(["sleep", "60"], cwd=own.data_dir)
    try:
        own.stop()
        assert own.processes() == set()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
        own.start()


def test_a_half_made_data_directory_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(parents=True)
    (tmp_path / "data" / "PG_VERSION").write_text("15\n")

    with pytest.raises(PostgresError, match="did not finish"):
        PostgresCluster(tmp_path).init()


def test_a_missing_postgresql_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(PostgresError, match="make system-deps"):
        server_bin_dir(tmp_path)
