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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from appliance._private.edge import EdgeGate, is_fleet_principal
from appliance._private.engines.base import Finish, Generation, Prompt, SamplingParams
from appliance._private.metrics import ApplianceMetrics
from appliance._private.served import ServedModel
from compliance import Recorder
from federation import INTERRUPTED, Admission, APIError, Principal, Tenancy

RequestKind = Literal["generation", "embedding", "prediction"]


@dataclass(slots=True)
class Ticket:
    """One request to one model, from its model lookup to its end."""

    principal: Principal
    served: ServedModel
    record_id: str  # the answer's id and its audit row's
    kind: RequestKind
    admission: Admission | None = None
    admitted: bool = False
    ended: bool = False

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

    # --- admission -----------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(
        self,
        principal: Principal,
        served: ServedModel,
        prefix: str,
        kind: RequestKind = "generation",
    ) -> Iterator[Ticket]:
        """A ticket for a request to `served`, counted in flight on it from now (right after
        the model lookup, before any `await`, so that a model being replaced drains it). An
        admitted ticket is released by `finished`; one that never got admitted (refused by
        validation or by the limits) when this block ends."""
        served.acquire()
        ticket = Ticket(principal, served, f"{prefix}-{os.urandom(12).hex()}", kind)
        try:
            yield ticket
        finally:
            if not ticket.admitted:
                served.release()

    def admit(self, ticket: Ticket, estimate: int) -> None:
        """Limits and budget for `estimate` (tokens; requests for a prediction), unless a
        router vouched for the caller (it enforces them); journals the `interrupted` row.
        From here the request ends in `finished`, exactly once."""
        ticket.admission = self._admission(
            ticket.principal, ticket.served, estimate, ticket.record_id
        )
        ticket.admitted = True

    def _admission(
        self, principal: Principal, served: ServedModel, estimate: int, record_id: str
    ) -> Admission | None:
        admission = None
        if self.edge is not None and is_fleet_principal(principal):
            audit = self.row(
                principal, served, estimate, 0, status=INTERRUPTED, record_id=record_id
            )
            admission = self.edge.admit(
                principal, estimate, request_id=record_id, model=served.id, audit=audit
            )
        elif self.tenancy is not None and principal.via is None:
            gate = self.tenancy.gate
            admission = gate.admit(principal, estimate, request_id=record_id, model=served.id)
        if self.recorder is not None:
            charged = admission.reserved if admission is not None else 0
            row = self.row(principal, served, charged, 0, status=INTERRUPTED, record_id=record_id)
            self.recorder.begin(principal.logging_mode, row)
        return admission

    # --- generations ---------------------------------------------------------------------

    def generate(self, ticket: Ticket, prompt: Prompt, params: SamplingParams) -> Generation:
        """Submit to the ticket's engine; the generation ends in `finished`, once, however
        it ends (a submission the engine refuses ends it here)."""

        def on_done(finish: Finish) -> None:
            self.finished(
                ticket,
                status_of(finish),
                finish.prompt_tokens,
                finish.completion_tokens,
                reason=finish.reason,
            )

        try:
            return ticket.served.engine.submit(prompt, params, on_done)
        except BaseException as exc:  # not submitted: nothing else will end it
            self.finished(ticket, exc.code if isinstance(exc, APIError) else "error", 0, 0)
            raise

    # --- the end -------------------------------------------------------------------------

    def finished(
        self,
        ticket: Ticket,
        status: str,
        input_tokens: int,
        output_tokens: int,
        *,
        reason: str | None = None,
    ) -> None:
        """The request is over: count it, settle its admission and write its audit row.
        `reason` is a generation's finish reason (None: no generation ran). A second call
        for the same ticket does nothing."""
        if ticket.ended:
            return
        ticket.ended = True
        principal, served = ticket.principal, ticket.served
        try:
            self._count(served.id, input_tokens, output_tokens, reason)
            if ticket.admission is not None:
                self._settle(ticket, status, input_tokens, output_tokens)
            if self.recorder is not None:
                row = self.row(
                    principal,
                    served,
                    input_tokens,
                    output_tokens,
                    status=status,
                    record_id=ticket.record_id,
                )
                self.recorder.request(principal.logging_mode, row)
        finally:
            served.release()

    def _count(self, model: str, input_tokens: int, output_tokens: int, reason: str | None) -> None:
        metrics = self.metrics
        if reason is not None:
            metrics.generations.labels(model, reason).inc()
        metrics.prompt_tokens.labels(model).inc(input_tokens)
        metrics.completion_tokens.labels(model).inc(output_tokens)

    def _settle(self, ticket: Ticket, status: str, input_tokens: int, output_tokens: int) -> None:
        principal, served, admission = ticket.principal, ticket.served, ticket.admission
        assert admission is not None
        cost = served.config.pricing.cost(input_tokens, output_tokens)
        if self.edge is not None and is_fleet_principal(principal):
            used = input_tokens, output_tokens
            self.edge.settle(
                admission,
                model=served.id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                status=status,
                cost=cost,
                audit=self.row(principal, served, *used, status=status, record_id=ticket.record_id),
            )
            return
        assert self.tenancy is not None
        self.tenancy.gate.settle(
            admission,
            model=served.id,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
            cost=cost,
        )

    def row(
        self,
        principal: Principal,
        served: ServedModel,
        input_tokens: int,
        output_tokens: int,
        *,
        status: str,
        record_id: str,
    ) -> dict[str, Any]:
        """A request's audit row."""
        return {
            "id": record_id,
            "org": principal.org,
            "user": principal.user,
            "key_id": principal.key_id,
            "model": served.id,
            "region": self.region,
            "node": self.node,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "status": status,
            **({"model_version": served.version} if served.version is not None else {}),
            **({"via": principal.via} if principal.via is not None else {}),
        }

    def content_keeper(
        self, principal: Principal, record_id: str, request: object
    ) -> Callable[[object], None] | None:
        """For orgs logging in `full`: a callback that seals the request and its answer."""
        recorder = self.recorder
        if recorder is None or recorder.mode_for(principal.logging_mode) != "full":
            return None

        def keep(answer: object) -> None:
            content = {"request": msgspec.to_builtins(request), "response": answer}
            recorder.content(principal.logging_mode, record_id, principal.org, content)

        return keep


def status_of(finish: Finish) -> str:
    """A finished generation's status in usage and audit rows."""
    return "ok" if finish.reason in ("stop", "length") else finish.reason
