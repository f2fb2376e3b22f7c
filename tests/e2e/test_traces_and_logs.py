"""Traces and JSON logs across a real router and a real appliance.

An OTLP/HTTP receiver (a real HTTP server decoding `ExportTraceServiceRequest` with the
opentelemetry-proto package) collects what both processes export. A request through the
router makes one trace: the router's server span with `auth`, `select_node` and `attempt`
under it, the appliance's server span under the attempt (joined by the `traceparent` the
router sent), and `admission` and `generation` (`queue`, `prefill`, `decode`) under that. A
client's `traceparent` and well-formed `X-Request-Id` are continued; a hostile id is replaced. A
marker sent in the prompts is in no span, no log line and no metric.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.fleet import running_fleet
from tests.support import wait_for

MODEL = "echo"
ROUTER_SPANS = {"POST /v1/chat/completions", "auth", "select_node", "attempt"}
NODE_SPANS = {"POST /v1/chat/completions", "admission", "generation", "queue", "prefill", "decode"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class Receiver:
    """What an OTLP/HTTP collector received: every span, and every raw body."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    spans.append(
                        ReceivedSpan(
                            resource["service.name"],
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            attributes,
                        )
                    )
        with self.lock:
            self.bodies.append(body)
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 200
            try:
                receiver.take(body)
            except Exception:  # noqa: BLE001 - a body that does not decode fails the export
                status = 400
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _whole_trace(receiver: Receiver, trace_id: str) -> list[ReceivedSpan] | None:
    spans = receiver.trace(trace_id)
    router = {s.name for s in spans if s.service == "palisade-router"}
    node = {s.name for s in spans if s.service == "palisade-appliance"}
    return spans if router >= ROUTER_SPANS and node >= NODE_SPANS else None


def _check_linked(spans: list[ReceivedSpan], client_parent: str = "") -> None:
    """One tree: the router's server span at the root (under the client's span, if it sent
    one), the node's server span under the router's attempt."""
    by_id = {span.span_id: span for span in spans}
    router_root = next(
        s for s in spans if s.service == "palisade-router" and s.name.startswith("POST")
    )
    node_root = next(
        s for s in spans if s.service == "palisade-appliance" and s.name.startswith("POST")
    )
    assert router_root.parent_id == client_parent
    attempt = by_id[node_root.parent_id]
    assert (attempt.service, attempt.name) == ("palisade-router", "attempt")
    assert attempt.parent_id == router_root.span_id
    for span in spans:
        if span not in (router_root, node_root):
            parent = by_id[span.parent_id]  # every other span's parent was received
            assert parent.service == span.service
    selection = next(s for s in spans if s.name == "select_node")
    assert selection.attributes["palisade.chosen"] == "trace-node"
    assert "trace-node" in selection.attributes["palisade.candidates"]
    generation = next(s for s in spans if s.name == "generation")
    assert generation.attributes["gen_ai.usage.output_tokens"] > 0
    steps = {s.name: s for s in spans if s.parent_id == generation.span_id}
    assert set(steps) == {"queue", "prefill", "decode"}
    assert steps["queue"].attributes["palisade.queue.slots"] >= 1


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_one_trace_across_router_and_node_and_json_logs_without_content(
    tmp_path: Path,
) -> None:
    marker = f"TRACE-MARKER-{uuid.uuid4().hex}"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"Repeat {marker}"}]}
    client_trace, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with otlp_receiver() as (collector, receiver):
        observed = ["--log-format", "json", "--otlp-endpoint", collector]
        with running_fleet(tmp_path, *observed) as fleet:
            member = fleet.start_member(
                "trace-node",
                "eu-west",
                f'[[models]]\nengine = "scripted"\nid = "{MODEL}"\n\n[logs]\nformat = "json"\n\n'
                f'[traces]\notlp_endpoint = "{collector}"\n',
            )
            fleet.wait_joined("trace-node")
            key = fleet.org_key("acme", ["eu-west"])
            auth = {"Authorization": f"Bearer {key}"}
            url = f"{fleet.router.url}/v1/chat/completions"

            plain = httpx.post(url, json=chat, headers=auth, timeout=60)
            assert plain.status_code == 200, plain.text
            assert marker in plain.text
            plain_id = plain.headers["x-request-id"]
            assert plain_id.startswith("route-")

            named = {
                "X-Request-Id": "client-req.42:a",
                "traceparent": f"00-{client_trace}-{client_span}-01",
            }
            with httpx.stream(
                "POST", url, json=chat | {"stream": True}, headers=auth | named, timeout=60
            ) as streamed:
                assert streamed.status_code == 200
                assert marker in streamed.read().decode()
            assert streamed.headers["x-request-id"] == "client-req.42:a"

            hostile = httpx.post(
                url, json=chat, headers=auth | {"X-Request-Id": "x" * 200}, timeout=60
            )
            assert hostile.status_code == 200
            assert hostile.headers["x-request-id"].startswith("route-")
            refused = httpx.post(url, json=chat, headers={"X-Request-Id": "who-42"}, timeout=60)
            assert refused.status_code == 401
            assert refused.headers["x-request-id"] == "who-42"

            continued = wait_for(lambda: _whole_trace(receiver, client_trace), timeout=30)
            _check_linked(continued, client_parent=client_span)
            metrics = [
                httpx.get(f"{server.url}/metrics", timeout=10, verify=server.verify).text
                for server in (fleet.router, member)
            ]
            router_lines = _json_lines(fleet.router.log_text())
            access = [line for line in router_lines if line["logger"] == "palisade.access"]
            assert any(line["request_id"] == plain_id for line in access), router_lines
            plain_line = next(line for line in access if line["request_id"] == plain_id)
            plain_trace = wait_for(lambda: _whole_trace(receiver, plain_line["trace_id"]))
            _check_linked(plain_trace)
            fleet.router.stop()
            member.stop()
            logs = {"router": fleet.router.log_text(), "node": member.log_text()}

    for name, text in logs.items():
        lines = _json_lines(text)
        assert lines, name
        texts = [line for line in text.splitlines() if " INFO " in line or " WARNING " in line]
        assert texts == [], f"{name} wrote log lines that are not JSON: {texts}"
        for line in lines:
            assert {"timestamp", "level", "logger", "message", "node"} <= set(line)
        requests = [line for line in lines if line["logger"] == "palisade.access"]
        assert len(requests) >= 3, name
        for line in requests:
            assert line["request_id"], line
            assert len(line["trace_id"]) == 32, line
    node_lines = _json_lines(logs["node"])
    node_access = [line for line in node_lines if line["logger"] == "palisade.access"]
    # The node's lines carry the router's request id and the same trace.
    assert {line["request_id"] for line in node_access} >= {plain_id, "client-req.42:a"}
    assert {line["trace_id"] for line in node_access} >= {client_trace}
    assert all(line["region"] == "eu-west" for line in node_lines)
    assert next(line for line in node_access if line["request_id"] == plain_id)["org"] == "acme"
    needle = marker.encode()
    assert not any(needle in body for body in receiver.bodies)
    assert [name for name, text in logs.items() if marker in text] == []
    assert not any(marker in text for text in metrics)
