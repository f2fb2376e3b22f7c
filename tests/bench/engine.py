"""Engine benchmark: the appliance's streaming chat endpoint against raw llama-cpp-python.

Both sides run the same GGUF, the same chat-templated prompt and greedy decoding through
`Llama.generate`, interleaved (raw, appliance, raw, ...) so only one decodes at a time.
TTFT is call -> first non-empty text; decode speed is (tokens - 1) / (last - first text).
"""

from __future__ import annotations

import codecs
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance import DEFAULT_MODEL_ID
from tests.support import Appliance, default_model_path, model_toml, run_appliance

PROMPT = "Write a long story about a dragon who guards a library."
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 128
CONTEXT_LENGTH = 2048
THREADS = os.cpu_count() or 1
DECODE_TARGET = 0.95  # appliance decode tok/s at least this fraction of raw
TTFT_TARGET_MS = 2.0  # appliance TTFT p50 at most this much above raw
BUSY_CORES = 0.1  # other processes using more CPU than this on average make figures unreliable
CACHE_NOTE = (
    "llama-cpp-python reuses the KV-cache prefix of a repeated prompt, so after warm-up both "
    "sides re-evaluate only the prompt's last token: TTFT is one decode step plus overhead."
)


@dataclass(frozen=True)
class Run:
    """One measured generation."""

    ttft_ms: float
    decode_tok_s: float
    prompt_tokens: int
    completion_tokens: int
    text: str


class _Timeline:
    """Text pieces with their arrival times, turned into a `Run` at the end."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.last = started
        self.pieces: list[str] = []

    def add(self, text: str) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces.append(text)

    def run(self, prompt_tokens: int, completion_tokens: int) -> Run:
        if self.first is None or completion_tokens < 2 or self.last <= self.first:
            raise RuntimeError(
                f"only {completion_tokens} tokens came back; the benchmark needs a prompt "
                "that produces long output"
            )
        return Run(
            ttft_ms=(self.first - self.started) * 1000,
            decode_tok_s=(completion_tokens - 1) / (self.last - self.first),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            text="".join(self.pieces),
        )


# --- raw llama-cpp-python, in process -------------------------------------------------------


class RawEngine:
    """llama-cpp-python driven the way the appliance's engine drives it, minus the server."""

    def __init__(self, model_path: Path) -> None:
        self.llm: Any = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=CONTEXT_LENGTH,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            # llama.cpp's own default (auto: on for CPU), as the appliance's engine runs it.
            flash_attn=True,
            # The appliance's KV cache (8-bit keys, f16 values: its batches stay exact), so
            # the two texts can be compared token for token; llama.cpp's default f16 keys
            # decode at the same speed here.
            type_k=llama_cpp.GGML_TYPE_Q8_0,
            type_v=llama_cpp.GGML_TYPE_F16,
            verbose=False,
        )
        self.formatter = self._chat_formatter()
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.is_eog: Callable[[int], bool] = lambda token: bool(
            llama_cpp.llama_vocab_is_eog(vocab, token)
        )

    def _chat_formatter(self) -> Any:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError("the model has no tokenizer.chat_template in its GGUF metadata")
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self.llm.token_eos()),
            bos_token=self._token_text(self.llm.token_bos()),
            add_generation_prompt=True,
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.llm.detokenize([token], special=True)).decode("utf-8", "replace")

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = self.formatter(messages=messages)
        prompt: str = rendered.prompt
        tokens = self.llm.tokenize(
            prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        return [int(token) for token in tokens]

    def run(self, prompt: list[int], *, max_tokens: int = MAX_TOKENS) -> Run:
        """Greedy decode of up to `max_tokens`, detokenizing each token as the appliance does."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        timeline = _Timeline(time.perf_counter())
        produced = 0
        tokens = self.llm.generate(
            prompt, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0
        )
        for token in tokens:
            if self.is_eog(token):
                break
            produced += 1
            timeline.add(utf8.decode(self.llm.detokenize([token])))
            if produced >= max_tokens:
                break
        timeline.add(utf8.decode(b"", final=True))
        return timeline.run(len(prompt), produced)

    def close(self) -> None:
        self.llm.close()


# --- the appliance, over HTTP ---------------------------------------------------------------

REQUEST_BODY = json.dumps(
    {
        "model": DEFAULT_MODEL_ID,
        "messages": MESSAGES,
        "stream": True,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream_options": {"include_usage": True},
    }
).encode()


def stream_chat(client: httpx.Client) -> Run:
    """One streamed chat completion; times are taken as each SSE line is read."""
    usage: dict[str, int] = {}
    timeline = _Timeline(time.perf_counter())
    with client.stream("POST", "/chat/completions", content=REQUEST_BODY) as response:
        response.raise_for_status()
        for event in _sse_events(response.iter_lines()):
            if "error" in event:
                raise RuntimeError(f"the appliance reported an error: {event['error']}")
            timeline.add(_delta_content(event))
            usage = event.get("usage") or usage
    if not usage:
        raise RuntimeError("the stream ended without a usage chunk")
    return timeline.run(usage["prompt_tokens"], usage["completion_tokens"])


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        event: dict[str, Any] = json.loads(data)
        yield event


def _delta_content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    content: str | None = choices[0].get("delta", {}).get("content")
    return content or ""


def appliance_client(appliance: Appliance) -> httpx.Client:
    """A keep-alive client, so warm-up opens the connection and runs reuse it."""
    return httpx.Client(
        base_url=appliance.v1,
        headers={"Content-Type": "application/json"},
        timeout=httpx.Timeout(120.0),
    )


# --- the comparison -------------------------------------------------------------------------


@dataclass
class Samples:
    raw: list[Run]
    appliance: list[Run]


def interleave(raw: RawEngine, client: httpx.Client, *, repeats: int, warmups: int) -> Samples:
    """Alternate raw and appliance runs; the first `warmups` of each are discarded."""
    prompt = raw.prompt_tokens(MESSAGES)
    samples = Samples(raw=[], appliance=[])
    for index in range(warmups + repeats):
        raw_run = raw.run(prompt)
        appliance_run = stream_chat(client)
        if index >= warmups:
            samples.raw.append(raw_run)
            samples.appliance.append(appliance_run)
        _progress(index, warmups, raw_run, appliance_run)
    return samples


def _progress(index: int, warmups: int, raw: Run, appliance: Run) -> None:
    label = f"warm-up {index + 1}" if index < warmups else f"run {index - warmups + 1}"
    print(
        f"  {label:>10}: raw {raw.ttft_ms:6.1f} ms {raw.decode_tok_s:6.1f} tok/s | "
        f"appliance {appliance.ttft_ms:6.1f} ms {appliance.decode_tok_s:6.1f} tok/s",
        flush=True,
    )


class CpuWatch:
    """CPU used by other processes (and stolen by the hypervisor) while the benchmark ran.

    Reads /proc, so it reports nothing off Linux. `pids` are the benchmark's own processes.
    """

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self._started = time.perf_counter()
        self._before = self._ticks()

    def _ticks(self) -> tuple[int, int, int] | None:
        """Machine busy ticks, stolen ticks and this benchmark's own ticks."""
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            own = sum(_process_ticks(pid) for pid in self._pids)
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
        return user + nice + system + irq + softirq, steal, own

    def report(self) -> dict[str, float] | None:
        """Average cores used by other processes and stolen, since construction."""
        after = self._ticks()
        if self._before is None or after is None:
            return None
        busy, steal, own = (end - start for end, start in zip(after, self._before, strict=True))
        seconds = (time.perf_counter() - self._started) * os.sysconf("SC_CLK_TCK")
        return {"other_cores": max(0, busy - own) / seconds, "stolen_cores": steal / seconds}


def _process_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def summarize(samples: Samples, contention: dict[str, float] | None) -> dict[str, Any]:
    raw_ttft = _median(run.ttft_ms for run in samples.raw)
    app_ttft = _median(run.ttft_ms for run in samples.appliance)
    raw_decode = _median(run.decode_tok_s for run in samples.raw)
    app_decode = _median(run.decode_tok_s for run in samples.appliance)
    overhead = app_ttft - raw_ttft
    ratio = app_decode / raw_decode
    return {
        "ttft_p50_ms": {"raw": raw_ttft, "appliance": app_ttft},
        "ttft_p50_overhead_ms": overhead,
        "decode_p50_tok_s": {"raw": raw_decode, "appliance": app_decode},
        "decode_ratio": ratio,
        "targets": {
            "decode_ratio_min": DECODE_TARGET,
            "decode_met": ratio >= DECODE_TARGET,
            "ttft_overhead_max_ms": TTFT_TARGET_MS,
            "ttft_met": overhead <= TTFT_TARGET_MS,
        },
        "tokens": _token_counts(samples),
        "contention": contention,
    }


def _median(values: Iterator[float]) -> float:
    return statistics.median(list(values))


def _token_counts(samples: Samples) -> dict[str, Any]:
    raw_texts = {run.text for run in samples.raw}
    app_texts = {run.text for run in samples.appliance}
    return {
        "prompt": {
            "raw": sorted({run.prompt_tokens for run in samples.raw}),
            "appliance": sorted({run.prompt_tokens for run in samples.appliance}),
        },
        "completion": {
            "raw": sorted({run.completion_tokens for run in samples.raw}),
            "appliance": sorted({run.completion_tokens for run in samples.appliance}),
        },
        "same_text": raw_texts == app_texts and len(raw_texts) == 1,
    }


def warnings(summary: dict[str, Any]) -> list[str]:
    tokens, contention = summary["tokens"], summary["contention"]
    found = []
    if contention is not None and max(contention.values()) > BUSY_CORES:
        found.append(
            f"other processes used {contention['other_cores']:.2f} cores and the hypervisor "
            f"stole {contention['stolen_cores']:.2f} on average during the runs: the figures "
            "are unreliable; rerun on a quiet machine"
        )
    raw, appliance = tokens["completion"]["raw"], tokens["completion"]["appliance"]
    if len(set(raw) | set(appliance)) > 1:
        found.append(
            f"completion token counts are not all equal (raw {_counts(raw)}, "
            f"appliance {_counts(appliance)})"
        )
    if tokens["prompt"]["raw"] != tokens["prompt"]["appliance"]:
        found.append("prompt token counts differ: the chat templates do not match")
    if not tokens["same_text"]:
        found.append("greedy outputs are not identical across sides and runs")
    return found


def print_table(summary: dict[str, Any], *, repeats: int, warmups: int) -> None:
    ttft, decode, tokens = summary["ttft_p50_ms"], summary["decode_p50_tok_s"], summary["tokens"]
    targets = summary["targets"]
    rows = [
        ("", "raw", "appliance", "appliance vs raw"),
        (
            "TTFT p50 (ms)",
            f"{ttft['raw']:.2f}",
            f"{ttft['appliance']:.2f}",
            f"{summary['ttft_p50_overhead_ms']:+.2f} ms",
        ),
        (
            "decode p50 (tok/s)",
            f"{decode['raw']:.1f}",
            f"{decode['appliance']:.1f}",
            f"{summary['decode_ratio']:.1%}",
        ),
        (
            "prompt tokens",
            _counts(tokens["prompt"]["raw"]),
            _counts(tokens["prompt"]["appliance"]),
            "",
        ),
        (
            "completion tokens",
            _counts(tokens["completion"]["raw"]),
            _counts(tokens["completion"]["appliance"]),
            "same text" if tokens["same_text"] else "texts differ",
        ),
    ]
    print(f"\nEngine benchmark: {repeats} interleaved runs per side after {warmups} warm-ups")
    for row in rows:
        print(f"  {row[0]:<20}{row[1]:>12}{row[2]:>12}{row[3]:>20}")
    print(f"  target decode >= {DECODE_TARGET:.0%} of raw: {_met(targets['decode_met'])}")
    print(f"  target TTFT overhead <= {TTFT_TARGET_MS:g} ms: {_met(targets['ttft_met'])}")
    print(f"  note: {CACHE_NOTE}")
    for warning in warnings(summary):
        print(f"  WARNING: {warning}")


def _counts(values: list[int]) -> str:
    return "/".join(str(value) for value in values)


def _met(met: bool) -> str:
    return "met" if met else "NOT met (informational)"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "llama_cpp": llama_cpp.__version__,
        "timestamp": datetime.now(UTC).astimezone().isoformat(),
    }


def write_json(
    summary: dict[str, Any],
    samples: Samples,
    *,
    model: Path,
    repeats: int,
    warmups: int,
    out_dir: Path,
) -> Path:
    report = {
        "benchmark": "engine",
        "machine": machine_info(),
        "setup": {
            "model": model.name,
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "context_length": CONTEXT_LENGTH,
            "threads": THREADS,
            "repeats": repeats,
            "warmups": warmups,
            "note": CACHE_NOTE,
        },
        "summary": summary,
        "warnings": warnings(summary),
        "samples": {
            "raw": [_sample(run) for run in samples.raw],
            "appliance": [_sample(run) for run in samples.appliance],
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "engine.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _sample(run: Run) -> dict[str, Any]:
    fields = asdict(run)
    del fields["text"]
    return fields


def run(*, repeats: int, warmups: int, out_dir: Path) -> dict[str, Any]:
    """Run the benchmark, print the table, write `out_dir`/engine.json; returns the summary."""
    model = default_model_path()
    print(f"Engine benchmark: {model.name}, {THREADS} threads, up to {MAX_TOKENS} tokens")
    raw = RawEngine(model)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="palisade-bench-") as home,
            run_appliance(Path(home), model_toml(path=str(model)), "--no-auth") as appliance,
            appliance_client(appliance) as client,
        ):
            watch = CpuWatch(os.getpid(), appliance.process.pid)
            samples = interleave(raw, client, repeats=repeats, warmups=warmups)
            contention = watch.report()
    finally:
        raw.close()
    summary = summarize(samples, contention)
    print_table(summary, repeats=repeats, warmups=warmups)
    path = write_json(
        summary, samples, model=model, repeats=repeats, warmups=warmups, out_dir=out_dir
    )
    print(f"\nwrote {path}")
    return summary
