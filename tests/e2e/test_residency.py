"""Residency fails closed: a real router and four real llama.cpp appliances in two regions."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from appliance import DEFAULT_MODEL_ID
from tests.e2e.fleet import llama_toml, running_fleet, served_by
from tests.support import Server, wait_for

EU = ("eu-1", "eu-2")
US = ("us-1", "us-2")
CHAT = "/v1/chat/completions"


def served_requests(member: Server) -> float:
    return member.metric("palisade_requests_total", endpoint=CHAT, status="200")


def ask(router: Server, key: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{router.url}{CHAT}",
        json={
            "model": DEFAULT_MODEL_ID,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 1,
        },
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=60,
    )


def test_an_eu_key_is_served_only_in_eu_and_never_elsewhere_when_eu_is_gone(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        for node in EU:
            fleet.start_member(node, "eu-west", llama_toml(threads=1))
        for node in US:
            fleet.start_member(node, "us-east", llama_toml(threads=1))
        fleet.wait_joined(*EU, *US)
        # The org may use both regions; this key only eu-west.
        eu_key = fleet.org_key("acme", ["eu-west", "us-east"], key_regions=["eu-west"])

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: ask(fleet.router, eu_key), range(200)))
        assert [r.status_code for r in replies] == [200] * 200
        receipts = [served_by(r) for r in replies]
        assert {region for region, _, _ in receipts} == {"eu-west"}
        assert {node for _, node, _ in receipts} <= set(EU)
        # The appliances' own counters agree with the receipts.
        eu_counts = [served_requests(fleet.members[node]) for node in EU]
        assert sum(eu_counts) == 200
        us_before = [served_requests(fleet.members[node]) for node in US]
        assert us_before == [0, 0]

        for node in EU:
            fleet.members[node].process.send_signal(signal.SIGKILL)
            fleet.members[node].process.wait(timeout=10)
        for _ in range(20):
            refused = ask(fleet.router, eu_key)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "no_backend_in_region"
            assert "eu-west" in error["message"]
            assert refused.headers["retry-after"] == "1"
        fleet.wait_state("down", *EU, timeout=10)
        assert ask(fleet.router, eu_key).json()["error"]["code"] == "no_backend_in_region"
        assert [served_requests(fleet.members[node]) for node in US] == us_before

        # The same org's unrestricted key is still served, in us-east: the fleet works.
        wide_key = fleet.admin.member("acme", "org_user", "wide@acme.test").key
        wide = ask(fleet.router, wide_key)
        assert wide.status_code == 200
        assert served_by(wide)[0] == "us-east"


def test_the_region_header_only_narrows_and_the_sdk_sees_receipts(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.start_member("eu-1", "eu-west", llama_toml(threads=1))
        fleet.start_member("us-1", "us-east", llama_toml(threads=1))
        fleet.wait_joined("eu-1", "us-1")
        key = fleet.org_key("globex", ["eu-west", "us-east"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)

        narrowed = client.chat.completions.with_raw_response.create(
            model=DEFAULT_MODEL_ID,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_headers={"X-Palisade-Regions": "us-east"},
        )
        assert narrowed.headers["x-palisade-region"] == "us-east"
        assert narrowed.headers["x-palisade-node"] == "us-1"
        assert narrowed.headers["x-palisade-device"] == "cpu"
        assert narrowed.parse().usage is not None

        with pytest.raises(openai.PermissionDeniedError) as widened:
            client.chat.completions.create(
                model=DEFAULT_MODEL_ID,
                messages=[{"role": "user", "content": "Hi"}],
                extra_headers={"X-Palisade-Regions": "ap-south"},
            )
        assert widened.value.code == "residency_violation"
        assert "may only narrow" in widened.value.message

        listed = {model.id for model in client.models.list()}
        assert listed == {DEFAULT_MODEL_ID}
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "Hi"}]
            )
        assert unknown.value.code == "model_not_found"
        wait_for(lambda: fleet.router.metric("palisade_router_requests_total", status="403"))
