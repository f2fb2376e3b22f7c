"""Request decoding: every failure is a 400 that names the offending field."""

from __future__ import annotations

import msgspec
import pytest

from federation import ChatCompletionRequest, InvalidRequestError, decode_request

DECODER = msgspec.json.Decoder(ChatCompletionRequest)


def failure(body: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        decode_request(body, DECODER)
    return caught.value


def test_valid_request_decodes() -> None:
    request = decode_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', DECODER
    )
    assert request.model == "m"
    assert request.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{", "invalid_json", None),
        (b"[]", "invalid_value", None),
        (b'{"model": 1, "messages": []}', "invalid_value", "model"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "invalid_value",
            "messages[0].content",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "mood": "x"}]}',
            "unknown_parameter",
            "messages[0].mood",
        ),
        (b'{"messages": [{"role": "user"}]}', "missing_required_parameter", "model"),
        (b'{"model": "m", "messages": [{"role": "user"}], "top_p": 1.5}', "invalid_value", "top_p"),
    ],
)
def test_failures_carry_code_and_param(body: bytes, code: str, param: str | None) -> None:
    error = failure(body)
    assert error.code == code
    assert error.param == param
    assert error.status_code == 400
    if param:
        assert f"`{param}`" in error.message
