"""Admission and the one "request finished" path: metrics, settlement and the audit row.

Every request that reaches a model (chat, completions, embeddings, predictions) is
admitted here (`Ledger.admit`: the tenancy gate for local keys, the edge gate for fleet
keys, nothing for a router's assertion: the router enforces limits) and ends here
(`Ledger.finished`), exactly once however it ends: the per-model counters, the settlement
of the admission with its cost (`Pricing.cost`) and the request's audit row all happen in
that one place. Between the two, the request's audit row is journaled as `interrupted`, so
that a crash leaves it in the log (`Recorder.begin`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from appliance._private.edge import EdgeGate, is_fleet_principal
from appliance._private.engines.base import Finish, Generation, Prompt, SamplingParams
from appliance._private.metrics import ApplianceMetrics
from appliance._private.request_spans import generation_spans
from appliance._private.served import ServedModel
from compliance import Recorder
from federation import (
    FLEET_POLICY_VIA,
    FLEET_REQUEST_HEADER,
    INTERRUPTED,
    Admission,
    APIError,
    Children,
    Principal,
    RequestContext,
    RequestRecord,
    Tenancy,
    child_span,
    current_request,
    end_span,
    fleet_request_id,
)

RequestKind = Literal["generation", "embedding", "prediction"]


@dataclass(slots=True)
class Ticket:
    """One request to one model, from its model lookup to its end."""

    principal: Principal
    served: ServedModel
    record_id: str  # the answer's id and its audit row's
    kind: RequestKind
    # The router's id for this request, when a router sent it (`FLEET_REQUEST_HEADER`).
    fleet_request: str | None = None
    admission: Admission | None = None
    admitted: bool = False
    ended: bool = False
    # The HTTP request it serves (its request id, trace and org), when there is one.
    context: RequestContext | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The admission's headers (rate-limit and budget state), if this node admitted it."""
        return self.admission.headers if self.admission is not None else {}


class Ledger:
    """Admits requests and accounts for them when they end."""

    def __init__(
        self,
        *,
        region: str,
        node: str,
        metrics: ApplianceMetrics,
        tenancy: Tenancy | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.region = region
        self.node = node
        self.metrics = metrics
        self.tenancy = tenancy
        self.recorder = recorder
        # The offline edge (fleet keys admitted and metered by this node); set by the
        # composition root once the node has enrolled.
        self.edge: EdgeGate | None = None
        self._generations = Children(metrics.generations)
        self._prompt_tokens = Children(metrics.prompt_tokens)
        self._completion_tokens = Children(metrics.completion_tokens)

    # --- admission -----------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(
        self,
        principal: Principal,
        served: ServedModel,
        prefix: str,
        kind: RequestKind = "generation",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[Ticket]:
        """A ticket for a request to `served`, counted in flight on it from now (right after
        the model lookup, before any `await`, so that a model being replaced drains it). An
        admitted ticket is released by `finished`; one that never got admitted (refused by
        validation or by the limits) when this block ends. From the request's `headers`, the
        router's id for it (`fleet_request_of`) goes into its audit row."""
        served.acquire()
        record_id = f"{prefix}-{os.urandom(12).hex()}"
        fleet_request = fleet_request_of(principal, headers) if headers is not None else None
        ticket = Ticket(
            principal, served, record_id, kind, fleet_request, context=_noted(record_id, principal)
        )
        try:
            yield ticket
        finally:
            if not ticket.admitted:
                served.release()

    async def admit(self, ticket: Ticket, estimate: int) -> None:
        """Limits and budget for `estimate` (tokens; requests for a prediction), unless a
        router vouched for the caller (it enforces them); journals the `interrupted` row.
        From here the request ends in `finished`, exactly once."""
        span = child_span(ticket.context, "admission", attributes={"palisade.estimate": estimate})
        try:
            ticket.admission = await self._admission(ticket, estimate)
        except APIError as exc:
            if span is not None:
                end_span(span, exc.code)
            raise
        ticket.admitted = True
        if span is not None:
            end_span(span)

    async def _admission(self, ticket: Ticket, estimate: int) -> Admission | None:
        principal, served, record_id = ticket.principal, ticket.served, ticket.record_id
        admission = None
        if self.edge is not None and is_fleet_principal(principal):
            audit = self.row(ticket, estimate, 0, status=INTERRUPTED).row()
            admission = self.edge.admit(
                principal, estimate, request_id=record_id, model=served.id, audit=audit
            )
        elif self.tenancy is not None and principal.via is None:
            gate = self.tenancy.gate
            admission = await gate.admit_async(
                principal, estimate, request_id=record_id, model=served.id
            )
        if self.recorder is not None:
            charged = admission.reserved if admission is not None else 0
            row = self.row(ticket, charged, 0, status=INTERRUPTED)
            self.recorder.begin(principal.logging_mode, row)
        return admission

    # --- generations ---------------------------------------------------------------------

    def generate(self, ticket: Ticket, prompt: Prompt, params: SamplingParams) -> Generation:
        """Submit to the ticket's engine; the generation ends in `finished`, once, however
        it ends (a submission the engine refuses ends it here)."""

        context = ticket.context if ticket.context and ticket.context.span else None
        engine = ticket.served.engine
        load = engine.load_now() if context is not None else None  # the queue it joins

        def on_done(finish: Finish) -> None:
            self.finished(
                ticket,
                status_of(finish),
                finish.prompt_tokens,
                finish.completion_tokens,
                reason=finish.reason,
                cached_tokens=finish.cached_tokens,
            )
            if context is not None and load is not None:
                generation_spans(context, ticket.served.id, generation, finish, load)

        try:
            generation = engine.submit(prompt, params, on_done)
        except BaseException as exc:  # not submitted: nothing else will end it
            self.finished(ticket, exc.code if isinstance(exc, APIError) else "error", 0, 0)
            raise
        return generation

    # --- the end -------------------------------------------------------------------------

    def finished(
        self,
        ticket: Ticket,
        status: str,
        input_tokens: int,
        output_tokens: int,
        *,
        reason: str | None = None,
        cached_tokens: int = 0,
    ) -> None:
        """The request is over: count it, settle its admission and write its audit row.
        `reason` is a generation's finish reason (None: no generation ran); `cached_tokens`
        of the input tokens came from a prompt cache (they cost the cached-input price). A
        second call for the same ticket does nothing."""
        if ticket.ended:
            return
        ticket.ended = True
        principal, served = ticket.principal, ticket.served
        try:
            self._count(served.id, input_tokens, output_tokens, reason)
            if ticket.admission is not None:
                self._settle(ticket, status, input_tokens, output_tokens, cached_tokens)
            if self.recorder is not None:
                row = self.row(ticket, input_tokens, output_tokens, status=status)
                self.recorder.request(principal.logging_mode, row)
        finally:
            served.release()

    def _count(self, model: str, input_tokens: int, output_tokens: int, reason: str | None) -> None:
        if reason is not None:
            self._generations(model, reason).inc()
        self._prompt_tokens(model).inc(input_tokens)
        self._completion_tokens(model).inc(output_tokens)

    def _settle(
        self, ticket: Ticket, status: str, input_tokens: int, output_tokens: int, cached_tokens: int
    ) -> None:
        principal, served, admission = ticket.principal, ticket.served, ticket.admission
        assert admission is not None
        cost = served.config.pricing.cost(input_tokens, output_tokens, cached=cached_tokens)
        if self.edge is not None and is_fleet_principal(principal):
            self.edge.settle(
                admission,
                model=served.id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cached_tokens=cached_tokens,
                status=status,
                cost=cost,
                audit=self.row(ticket, input_tokens, output_tokens, status=status).row(),
            )
            return
        assert self.tenancy is not None
        self.tenancy.gate.settle(
            admission,
            model=served.id,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            status=status,
            cost=cost,
        )

    def row(
        self, ticket: Ticket, input_tokens: int, output_tokens: int, *, status: str
    ) -> RequestRecord:
        """A request's audit row."""
        principal, served = ticket.principal, ticket.served
        return RequestRecord(
            id=ticket.record_id,
            org=principal.org,
            user=principal.user,
            key_id=principal.key_id,
            model=served.id,
            region=self.region,
            node=self.node,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
            model_version=served.version,
            via=principal.via,
            fleet_request=ticket.fleet_request,
        )

    def content_keeper(
        self, principal: Principal, record_id: str, request_body: bytes
    ) -> Callable[[object], None] | None:
        """For orgs logging in `full`: a callback that seals the request, as the client sent
        it (its JSON, not our decoding of it), and its answer."""
        recorder = self.recorder
        if recorder is None or recorder.mode_for(principal.logging_mode) != "full":
            return None

        def keep(answer: object) -> None:
            content = {"request": msgspec.json.decode(request_body), "response": answer}
            recorder.content(principal.logging_mode, record_id, principal.org, content)

        return keep


def _noted(record_id: str, principal: Principal) -> RequestContext | None:
    """The HTTP request being served, told its org and its id (the record's, unless the
    client or the router named the request)."""
    context = current_request()
    if context is not None:
        context.adopt(record_id)
        context.org = principal.org
    return context


def fleet_request_of(principal: Principal, headers: Mapping[str, str]) -> str | None:
    """The router's id for a request it sent (`FLEET_REQUEST_HEADER`), taken only when a
    router vouched for the caller: anyone else could send the header."""
    if principal.via is None or principal.via == FLEET_POLICY_VIA:
        return None
    return fleet_request_id(headers.get(FLEET_REQUEST_HEADER))


def status_of(finish: Finish) -> str:
    """A finished generation's status in usage and audit rows."""
    return "ok" if finish.reason in ("stop", "length") else finish.reason
