"""Palisade's contract and control plane.

The OpenAI and management wire schemas, the shared error root, config decoding, and
tenancy: API keys, roles (RBAC), rate limits, budgets, usage metering and the /admin/v1
management API, node identity, principal assertions and the fleet protocol (heartbeats,
the join secret).
"""

import importlib
from typing import TYPE_CHECKING

from federation._private.admin_wire import (
    AuditEvent,
    Budget,
    CreatedKey,
    Invite,
    KeyInfo,
    KeyLimits,
    Org,
    UsageRecord,
    UsageReport,
    UsageRow,
    User,
)
from federation._private.assertion import (
    ASSERTION_HEADER,
    AssertionSigner,
    AssertionVerifier,
)
from federation._private.decoding import convert_config, decode_request, load_config
from federation._private.errors import (
    APIError,
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    PalisadeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from federation._private.fleet_wire import (
    FLEET_DECODER,
    HEARTBEAT_DECODER,
    REPLY_DECODER,
    FleetNode,
    FleetStatus,
    Heartbeat,
    HeartbeatReply,
    NodeModel,
)
from federation._private.gate import INTERRUPTED, REQUEST_ID_HEADER, Admission, Gate
from federation._private.identity import NodeIdentity, signature_valid
from federation._private.join import (
    JOIN_SECRET_ENV,
    SIGNATURE_HEADER,
    join_secret,
    sign_fleet_message,
    verify_fleet_message,
)
from federation._private.journal import Journal, LeaseBook, boot_id, journal_epoch
from federation._private.openai_wire import (
    ENCODER,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    ImageUrlPart,
    InputAudioPart,
    ModelCard,
    ModelList,
    Performance,
    Pricing,
    SamplingFields,
    TextPart,
    Usage,
)
from federation._private.policy import (
    Action,
    allowed,
    effective_mode,
    require,
    require_everywhere,
)
from federation._private.principal import LOCAL_PRINCIPAL, Principal
from federation._private.private_files import (
    private_database,
    private_dir,
    private_file,
    shown_secret,
    write_private,
)
from federation._private.serving import ServerConfig, bind_socket, url_of
from federation._private.store import AuditSink, Caller, StoreError, TenancyStore

__all__ = [
    "ASSERTION_HEADER",
    "ENCODER",
    "FLEET_DECODER",
    "HEARTBEAT_DECODER",
    "INTERRUPTED",
    "JOIN_SECRET_ENV",
    "LOCAL_PRINCIPAL",
    "PROMPT_TOKENS_HEADER",
    "REPLY_DECODER",
    "REQUEST_ID_HEADER",
    "SIGNATURE_HEADER",
    "APIError",
    "Action",
    "Admission",
    "AssertionSigner",
    "AssertionVerifier",
    "AssistantMessage",
    "AuditEvent",
    "AuditSink",
    "AuthenticationError",
    "Budget",
    "Caller",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "ClientGoneError",
    "ClosingStream",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "ConfigError",
    "CreatedKey",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "ErrorDetail",
    "ErrorResponse",
    "FleetNode",
    "FleetStatus",
    "Gate",
    "Heartbeat",
    "HeartbeatReply",
    "ImageUrlPart",
    "InputAudioPart",
    "InvalidRequestError",
    "Invite",
    "Journal",
    "KeyInfo",
    "KeyLimits",
    "LeaseBook",
    "ModelCard",
    "ModelList",
    "NodeIdentity",
    "NodeModel",
    "NotFoundError",
    "Org",
    "PalisadeError",
    "Performance",
    "PermissionDeniedError",
    "Pricing",
    "Principal",
    "RateLimitError",
    "SamplingFields",
    "ServerConfig",
    "ServiceUnavailableError",
    "StoreError",
    "Tenancy",
    "TenancyStore",
    "TextPart",
    "Usage",
    "UsageRecord",
    "UsageReport",
    "UsageRow",
    "User",
    "allowed",
    "announce_admin_key",
    "bind_socket",
    "boot_id",
    "budget_cli",
    "client_gone_response",
    "convert_config",
    "count_exits",
    "decode_request",
    "effective_mode",
    "error_handlers",
    "error_response",
    "join_secret",
    "journal_epoch",
    "key_cli",
    "limits_cli",
    "load_config",
    "make_server",
    "org_cli",
    "private_database",
    "private_dir",
    "private_file",
    "read_body",
    "require",
    "require_everywhere",
    "shown_secret",
    "sign_fleet_message",
    "signature_valid",
    "url_of",
    "usage_cli",
    "user_cli",
    "verify_fleet_message",
    "write_private",
]

if TYPE_CHECKING:
    from federation._private.admin_api import Tenancy, announce_admin_key
    from federation._private.cli import (
        budget_cli,
        key_cli,
        limits_cli,
        org_cli,
        usage_cli,
        user_cli,
    )
    from federation._private.http_errors import error_handlers, error_response
    from federation._private.http_exits import (
        PROMPT_TOKENS_HEADER,
        ClientGoneError,
        ClosingStream,
        client_gone_response,
        count_exits,
        read_body,
    )
    from federation._private.http_server import make_server

# Loaded on first use: they pull in Litestar, typer and httpx, which processes that never
# serve HTTP or parse a command line (the audit-log writer, the offline verifier) do without.
_LAZY = {
    "Tenancy": "federation._private.admin_api",
    "announce_admin_key": "federation._private.admin_api",
    "error_handlers": "federation._private.http_errors",
    "error_response": "federation._private.http_errors",
    "PROMPT_TOKENS_HEADER": "federation._private.http_exits",
    "ClientGoneError": "federation._private.http_exits",
    "ClosingStream": "federation._private.http_exits",
    "client_gone_response": "federation._private.http_exits",
    "count_exits": "federation._private.http_exits",
    "read_body": "federation._private.http_exits",
    "make_server": "federation._private.http_server",
    "budget_cli": "federation._private.cli",
    "key_cli": "federation._private.cli",
    "limits_cli": "federation._private.cli",
    "org_cli": "federation._private.cli",
    "usage_cli": "federation._private.cli",
    "user_cli": "federation._private.cli",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'federation' has no attribute {name!r}")
