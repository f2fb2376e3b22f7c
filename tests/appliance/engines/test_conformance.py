"""Every engine available here through the same checks (see conformance.py): one appliance
process per case, the official `openai` SDK against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.appliance.engines.conformance import CASES, CHECKS, EngineCase, Served, serve


@pytest.fixture(scope="module", params=[case.param() for case in CASES])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    case: EngineCase = request.param
    with serve(case, tmp_path_factory.mktemp(case.name)) as running:
        yield running


@pytest.mark.parametrize(
    "check", CHECKS, ids=[check.__name__.removeprefix("check_") for check in CHECKS]
)
def test_engine_conforms(served: Served, check: Callable[[Served], None]) -> None:
    check(served)
