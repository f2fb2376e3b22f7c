"""How the `openai` engine talks to its upstream: it reads the event stream as whole lines,
whatever sizes the body arrives in, including events far over the 128 KiB that common line
readers (aiohttp's) refuse (an echo with log probabilities of a long prompt); and an https
upstream is trusted by the same CAs for the requests as for the
model check at load (certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance._private.engines.base import EngineContext, Finish, SamplingParams
from appliance._private.engines.upstream.config import UpstreamModel
from appliance._private.engines.upstream.engine import OpenAIUpstreamEngine, _lines
from appliance._private.errors import ModelLoadError
from tests.standin import StandinTLS, run_standin

_COMMON_LINE_LIMIT = 2**17  # aiohttp's


async def _read_lines(pieces: list[bytes]) -> list[bytes]:
    async def arriving() -> AsyncIterator[bytes]:  # as `HttpResponse.iter_any` hands them on
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    return [line async for line in _lines(arriving())]


def _cut(body: bytes, seed: int) -> list[bytes]:
    """`body` in random pieces (some a single byte, some empty, some whole events)."""
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(body):
        size = rng.choice([0, 1, 7, 300, 70_000, 200_000])
        pieces.append(body[at : at + size])
        at += size
    return pieces


def _stream() -> bytes:
    huge = b'{"choices":[{"index":0,"text":"' + b"x" * (3 * _COMMON_LINE_LIMIT) + b'"}]}'
    events = [b'{"choices":[{"delta":{"content":"hi"}}]}', huge, b'{"usage":{}}']
    body = b"".join(b"data: " + event + b"\r\n\r\n" for event in events)
    return b": keep-alive\n\n" + body + b"data: [DONE]"  # the last line has no end


def test_lines_are_whole_however_the_body_is_cut() -> None:
    body = _stream()
    expected = body.split(b"\n")
    for seed in range(5):
        assert asyncio.run(_read_lines(_cut(body, seed))) == expected


def test_a_line_over_common_line_limits_arrives_whole() -> None:
    lines = asyncio.run(_read_lines([_stream()]))
    longest = max(lines, key=len)
    assert len(longest) > 3 * _COMMON_LINE_LIMIT
    assert longest.startswith(b"data: {")
    assert longest.endswith(b"}]}\r")
    assert lines[-1] == b"data: [DONE]"


# --- an https upstream: the model check and the requests trust the same CAs --------------


def _self_signed(folder: Path) -> StandinTLS:
    """A certificate for 127.0.0.1, its own CA (written to `cert.pem`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return StandinTLS(cert_path, key_path)


@pytest.fixture(scope="module")
def https_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tls = _self_signed(tmp_path_factory.mktemp("upstream-tls"))
    verify = ssl.create_default_context(cafile=str(tls.cert))
    with run_standin(tls=tls, verify=verify) as standin:
        yield standin.v1, tls.cert


def _engine(url: str) -> OpenAIUpstreamEngine:
    config = UpstreamModel(id="m", upstream_url=url, upstream_model="standin-model")
    return OpenAIUpstreamEngine(config, EngineContext(Path(), None, lambda *_: None))


async def _generate(engine: OpenAIUpstreamEngine) -> tuple[str, Finish | None]:
    prompt = await engine.prepare_chat([{"role": "user", "content": "hello there"}])
    generation = engine.submit(prompt, SamplingParams(max_tokens=3))
    text = "".join([piece async for piece in generation.stream()])
    engine.close()  # on its own loop it starts closing; let that finish before the loop ends,
    # or asyncio.run cancels it and the upstream connection is left to the collector
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))
    return text, generation.finish


def test_an_https_upstream_is_served_with_the_cas_it_was_checked_with(
    https_upstream: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca = https_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    engine = _engine(url)
    engine.load()
    text, finish = asyncio.run(_generate(engine))
    assert text == " tok0 tok1 tok2"
    assert finish is not None
    assert finish.reason == "length"


def test_an_https_upstream_with_an_unknown_ca_is_refused_at_load(
    https_upstream: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(ModelLoadError, match="CERTIFICATE_VERIFY_FAILED"):
        _engine(https_upstream[0]).load()
