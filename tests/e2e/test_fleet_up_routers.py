"""`palisade fleet up --routers 3 --database postgresql`: PostgreSQL (a private cluster
under PALISADE_HOME, migrated), three routers sharing one fleet directory and one store,
HAProxy in front of their public and fleet listeners. The printed curl line works through
HAProxy, every router knows every appliance (membership shared through the store), and
each router, asked directly, serves a request."""

from __future__ import annotations

import re
import shutil
import ssl
from pathlib import Path

import httpx

from tests.e2e.fleet import fleet_up
from tests.e2e.test_local_fleet import _CURL, pasted
from tests.support import wait_for

NODES = {"eu-west-1", "us-east-1"}
ROUTERS = ("router-1", "router-2", "router-3")
_DIRECT = re.compile(r"Palisade router (?P<id>router-\d+) listening on (?P<url>https://\S+)")


def direct_urls(text: str) -> dict[str, str]:
    """Each router's own public URL (the first it printed), by router id."""
    found: dict[str, str] = {}
    for match in _DIRECT.finditer(text):
        found.setdefault(match["id"], match["url"])
    return found


def test_three_routers_behind_haproxy_each_know_every_node_and_serve(tmp_path: Path) -> None:
    assert shutil.which("curl") is not None, "curl is needed to run the printed line"
    owner = tmp_path / "routers" / "router-1"
    with fleet_up(tmp_path, "--routers", "3", "--database", "postgresql") as fleet:
        trust = ssl.create_default_context(cafile=owner / "fleet" / "ca.pem")
        routers = direct_urls(fleet.text())
        assert set(routers) == set(ROUTERS), fleet.text()
        url = fleet.url()
        assert url not in routers.values()  # HAProxy's port, not a router's
        assert (tmp_path / "postgres" / "pgpass").stat().st_mode & 0o777 == 0o600
        password = (tmp_path / "postgres" / "palisade.password").read_text().strip()
        assert password not in fleet.text()  # from PGPASSFILE, never on a command line

        curl = _CURL.search(fleet.text())
        assert curl is not None, fleet.text()
        result = pasted(curl[1])
        assert result.returncode == 0, result.stderr
        assert '"object":"chat.completion"' in result.stdout

        admin_key = (owner / "admin.key").read_text().strip()
        demo_key = (owner / "demo.key").read_text().strip()
        for router, router_url in sorted(routers.items()):

            def knows_every_node(router: str = router, router_url: str = router_url) -> bool:
                listing = httpx.get(
                    f"{router_url}/federation/v1/fleet",
                    headers={"Authorization": f"Bearer {admin_key}"},
                    verify=trust,
                    timeout=10,
                ).json()
                up = {n["node_id"] for n in listing["nodes"] if n["state"] == "up"}
                assert listing["router_id"] == router
                return up == NODES

            wait_for(knows_every_node, timeout=30, interval=0.2)
            answer = httpx.post(
                f"{router_url}/v1/completions",
                json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1},
                headers={"Authorization": f"Bearer {demo_key}"},
                verify=trust,
                timeout=60,
            )
            assert answer.status_code == 200, (router, answer.text)
            assert answer.headers["x-palisade-node"] in NODES
