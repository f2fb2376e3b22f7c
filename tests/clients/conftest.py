"""Every client-library case runs against a standalone appliance and against a router with
one appliance (llama.cpp, the default model), each a real process that checks keys.

`target` is parametrized at package scope, so pytest runs every case against the appliance,
then against the router: each is started once for the whole package, since startup costs
more than the cases. Their llama.cpp runs one thread: on a shared two-core machine two
threads wait on each other at every step and a request can take 20 times as long.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from tests.clients.shared import Target
from tests.e2e.fleet import llama_toml, running_fleet
from tests.federation.tenants import admin_of, secured_appliance

# LiteLLM reads its price list from the package, not the network (set before it is imported).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

ORG = "agents"
NODE = "clients-1"
REGION = "eu-west"


@pytest.fixture(scope="package")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with secured_appliance(tmp_path_factory.mktemp("clients-appliance"), REGION, threads=1) as node:
        admin = admin_of(node)
        admin.create_org(ORG, [REGION])
        yield Target("appliance", node.v1, admin.member(ORG, "org_user", "dev@agents.test").key)


@pytest.fixture(scope="package")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with running_fleet(tmp_path_factory.mktemp("clients-fleet")) as fleet:
        fleet.start_member(NODE, REGION, llama_toml(threads=1))
        fleet.wait_joined(NODE)
        yield Target("router", fleet.router.v1, fleet.org_key(ORG, [REGION]))


@pytest.fixture(scope="package", params=["appliance", "router"])
def target(request: pytest.FixtureRequest) -> Target:
    chosen: Target = request.getfixturevalue(
        "standalone" if request.param == "appliance" else "routed"
    )
    return chosen


@pytest.fixture
def sdk(target: Target) -> Iterator[openai.OpenAI]:
    with target.client() as client:
        yield client
