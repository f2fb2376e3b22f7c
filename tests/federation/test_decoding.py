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


def _nested(depth: int, *, inside: bytes = b"") -> bytes:
    """A chat request with a `tools` value nested `depth` arrays deep (after `inside`)."""
    return (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
        + inside
        + b'"tools": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


@pytest.mark.parametrize("depth", [129, 1_000, 50_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    error = failure(_nested(depth))
    assert error.code == "invalid_json"
    assert "more than 128 levels deep" in error.message


def test_brackets_inside_strings_and_escapes_do_not_count() -> None:
    text = b'"' + b"[" * 5_000 + b'\\"' + b"{" * 5_000 + b'\\\\", '
    within = b'{"model": "m", "messages": [{"role": "user", "content": ' + text
    within += b'"name": "x"}]}'
    assert decode_request(within, DECODER).messages[0].name == "x"
    # An escaped backslash before the closing quote ends the string: the brackets count.
    assert failure(_nested(200, inside=b'"user": "a\\\\", ')).code == "invalid_json"
