"""Close codes and error codes: what each means and when the node uses it (PROTOCOL.md)."""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "ErrorCode"]


class CloseCode(IntEnum):
    GOING_AWAY = 1001        # graceful shutdown, drain, idle timeout: reconnect elsewhere
    INVALID_DATA = 1007      # a text frame that is not UTF-8 (RFC 6455 8.1)
    POLICY_VIOLATION = 1008  # too slow even at the heaviest throttle, control-frame flooding, forbidden
    MESSAGE_TOO_BIG = 1009   # a client frame over WS_MAX_FRAME_BYTES
    INTERNAL_ERROR = 1011    # a bug on our side; the client should reconnect
    TRY_AGAIN_LATER = 1013   # overload: reconnect with backoff
    TOKEN_EXPIRED = 4001     # the JWT expired while connected and no `refresh` replaced it
    REPLACED = 4002          # this user opened more connections than allowed; the oldest goes


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"                        # not JSON, not an object, unknown type, wrong field types
    INVALID_CHANNEL = "invalid_channel"                # pattern syntax (subjects.py)
    FORBIDDEN = "forbidden"                            # the token's `channels` do not allow it
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"  # over WS_MAX_SUBSCRIPTIONS
    RATE_LIMITED = "rate_limited"                      # over WS_CONTROL_RATE; repeated -> close 1008
    UNAUTHORIZED = "unauthorized"                      # `refresh` with a bad, expired or other-user token
