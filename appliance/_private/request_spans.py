"""The appliance's spans of a traced request, derived from what a generation reports.

Engines are not instrumented: a `Generation` records when it was submitted, when it left
its engine's queue (`mark_started`) and when its first text came (its time to first
token), and its `Finish` the tokens read, cached and written. From those: `queue`
(submission to start, with the queue it joined as attributes), `prefill` (start to first
token) and `decode` (first token to the end), under a `generation` span with the token
counts. Only counts, timings and names: never a prompt or an answer.
"""

from __future__ import annotations

import time

from appliance._private.engines.base import EngineLoad, Finish, Generation
from federation import RequestContext, child_span, end_span


def _epoch_ns(perf: float, now_perf: float, now_ns: int) -> int:
    return now_ns - int((now_perf - perf) * 1e9)


def generation_spans(
    context: RequestContext, model: str, generation: Generation, finish: Finish, load: EngineLoad
) -> None:
    """Record a finished generation's spans (`load`: the engine's, when it was submitted)."""
    now_perf, now_ns = time.perf_counter(), time.time_ns()
    started = _epoch_ns(generation.submitted_at, now_perf, now_ns)
    whole = child_span(
        context,
        "generation",
        attributes={
            "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": finish.prompt_tokens,
            "gen_ai.usage.output_tokens": finish.completion_tokens,
            "palisade.cached_tokens": finish.cached_tokens,
            "palisade.finish_reason": finish.reason,
        },
        start_ns=started,
    )
    if whole is None:
        return
    tracing = context.tracing
    assert tracing is not None
    first = generation.first_token_at
    prefill_end = _epoch_ns(first, now_perf, now_ns) if first is not None else now_ns
    left_queue = generation.started_at
    # A generation that never left the queue (cancelled, refused) waited until its end.
    prefill_start = _epoch_ns(left_queue, now_perf, now_ns) if left_queue is not None else now_ns
    queue = tracing.child(
        whole,
        "queue",
        attributes={
            "palisade.queue.running": load.running,
            "palisade.queue.waiting": load.waiting,
            "palisade.queue.slots": load.slots,
        },
        start_ns=started,
    )
    end_span(queue, end_ns=prefill_start)
    failure = finish.failure.code if finish.failure is not None else None
    failure = failure or (finish.reason if finish.reason == "error" else None)
    if left_queue is None:
        end_span(whole, failure, now_ns)
        return
    prefill = tracing.child(
        whole,
        "prefill",
        attributes={
            "palisade.prompt_tokens": finish.prompt_tokens,
            "palisade.cached_tokens": finish.cached_tokens,
        },
        start_ns=prefill_start,
    )
    end_span(prefill, end_ns=prefill_end)
    if first is not None:
        decode = tracing.child(
            whole,
            "decode",
            attributes={"palisade.completion_tokens": finish.completion_tokens},
            start_ns=prefill_end,
        )
        end_span(decode, end_ns=now_ns)
    end_span(whole, failure, now_ns)
