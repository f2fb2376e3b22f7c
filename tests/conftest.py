"""Shared fixtures: one real appliance process for the whole session, and its clients; and
the session's one PostgreSQL cluster (`postgres`, from tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.postgres import postgres
from tests.support import Appliance, model_toml, run_appliance

# Registered here, for every test module: a module that imported the fixture itself would get
# a cluster of its own (a fixture is instantiated once per place it is defined), 4-10 s each.
__all__ = ["postgres"]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    home: Path = tmp_path_factory.mktemp("appliance-home")
    config = "\n".join(
        [
            'node_id = "edge-test-1"',
            'region = "eu-west"',
            model_toml(
                device_class="cpu",
                **{"pricing.input_per_million": 0.5, "pricing.output_per_million": 1.5},
            ),
        ]
    )
    with run_appliance(home, config, "--no-auth") as running:
        yield running


@pytest.fixture(scope="session")
def client(appliance: Appliance) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=appliance.v1, api_key="not-checked-yet", max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def http(appliance: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=appliance.url, timeout=120) as session:
        yield session
