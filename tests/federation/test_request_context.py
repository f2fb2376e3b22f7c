"""Request ids, W3C trace context and JSON log lines, without sockets."""

from __future__ import annotations

import json
import logging

import pytest

from federation import (
    LogsConfig,
    RequestContext,
    TraceParent,
    TracesConfig,
    well_formed_request_id,
)
from federation._private.request_context import enter_request, leave_request
from federation._private.structured_logs import JsonLines

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("good", ["a", "req-123", "client.req:42_x-Y", "A" * 128])
def test_a_well_formed_client_id_is_taken(good: str) -> None:
    assert well_formed_request_id(good) == good


@pytest.mark.parametrize(
    "bad", [None, "", "A" * 129, "-leading", "with space", "new\nline", 'quote"', "é"]
)
def test_a_hostile_or_broken_client_id_is_replaced(bad: str | None) -> None:
    assert well_formed_request_id(bad) is None
    context = RequestContext(well_formed_request_id(bad), None)
    assert context.request_id.startswith("req-")


def test_traceparent_is_parsed_and_written_back() -> None:
    parent = TraceParent.parse(f"00-{TRACE}-{SPAN}-01")
    assert parent == TraceParent(TRACE, SPAN, sampled=True)
    assert parent.header() == f"00-{TRACE}-{SPAN}-01"
    assert TraceParent.parse(f"00-{TRACE}-{SPAN}-00") == TraceParent(TRACE, SPAN, sampled=False)


@pytest.mark.parametrize(
    "bad",
    [
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # the forbidden version
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has no more fields
        f"00-{TRACE[:-1]}-{SPAN}-01",
        "x" * 600,
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(bad: str) -> None:
    assert TraceParent.parse(bad) is None
    assert len(RequestContext(None, TraceParent.parse(bad)).trace_id) == 32


def test_the_admission_id_names_the_request_unless_the_client_did() -> None:
    ours = RequestContext(None, None)
    ours.adopt("route-abc")
    assert ours.request_id == "route-abc"
    theirs = RequestContext("client-1", None)
    theirs.adopt("route-abc")
    assert theirs.request_id == "client-1"
    used = RequestContext(None, None)
    first = used.request_id  # a log line named it already: it keeps that id
    used.adopt("route-abc")
    assert used.request_id == first


def test_the_next_hop_continues_the_trace() -> None:
    context = RequestContext("client-1", TraceParent(TRACE, SPAN, sampled=True))
    # Without tracing on: the caller's parent is passed on as it came.
    assert context.forwarded() == {
        "X-Request-Id": "client-1",
        "traceparent": f"00-{TRACE}-{SPAN}-01",
    }
    context.span_id, context.sampled = "1111111111111111", True
    hop = context.forwarded("2222222222222222")
    assert hop["traceparent"] == f"00-{TRACE}-2222222222222222-01"
    fresh = RequestContext(None, None).forwarded()
    parsed = TraceParent.parse(fresh["traceparent"])
    assert parsed is not None
    assert not parsed.sampled


def test_json_lines_name_the_request_being_served() -> None:
    formatter = JsonLines("node-1", "eu-west")
    record = logging.LogRecord("palisade.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    outside = json.loads(formatter.format(record))
    assert outside["message"] == "hello you"
    assert {"node": "node-1", "region": "eu-west", "level": "INFO"}.items() <= outside.items()
    assert "request_id" not in outside
    context = RequestContext("client-1", TraceParent(TRACE, SPAN, sampled=False))
    context.org = "acme"
    token = enter_request(context)
    try:
        inside = json.loads(formatter.format(record))
    finally:
        leave_request(token)
    assert (inside["request_id"], inside["trace_id"], inside["org"]) == ("client-1", TRACE, "acme")
    assert inside["timestamp"].endswith("Z")


def test_access_lines_default_to_the_json_format() -> None:
    assert LogsConfig(format="json").access_lines()
    assert not LogsConfig().access_lines()
    assert LogsConfig(access=True).access_lines()


def test_traces_are_off_unless_an_endpoint_is_configured_or_in_the_environment() -> None:
    assert TracesConfig().resolved({}).traces_url() is None
    base = TracesConfig(otlp_endpoint="http://collector:4318").resolved({})
    assert base.traces_url() == "http://collector:4318/v1/traces"
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
    assert TracesConfig().resolved(env).traces_url() == "http://c:4318/v1/traces"
    ratio = TracesConfig().resolved(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    )
    assert ratio.sample_ratio == 0.25
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    assert base.resolved(disabled).traces_url() is None
