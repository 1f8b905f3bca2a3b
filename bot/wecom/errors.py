"""Typed WeCom API errors (reference §0.1, §4.6, §5.1 and §7).

Branch on `errcode`, never on `errmsg`. Messages name the API path and errcode only: an access token, a secret
or a robot key never appears in an error's text.
"""

from __future__ import annotations

# "system busy": retry, but no more than 3 times (reference §5.1).
SYSTEM_BUSY = -1
# Token problems: drop the cached token (if it is still the one that failed) and retry once with a fresh one.
INVALID_ACCESS_TOKEN = 40014
ACCESS_TOKEN_EXPIRED = 42001
MISSING_ACCESS_TOKEN = 41001
TOKEN_ERRCODES = frozenset({INVALID_ACCESS_TOKEN, ACCESS_TOKEN_EXPIRED, MISSING_ACCESS_TOKEN})
# Frequency / concurrency limits: back off and retry (reference §5.1, §7).
FREQUENCY_LIMIT = 45009
CONCURRENCY_LIMIT = 45033
# Only these WeCom errcodes are worth retrying; every other non-zero errcode is a parameter, permission or
# state error that a retry cannot fix.
RETRYABLE_ERRCODES = frozenset({SYSTEM_BUSY, FREQUENCY_LIMIT, CONCURRENCY_LIMIT})
# gettoken credential errors: a configuration problem. Repeating a wrong secret bans the IP for an hour.
INVALID_SECRET = 40001
INVALID_CORPID = 40013
CREDENTIAL_ERRCODES = frozenset({INVALID_SECRET, INVALID_CORPID, 40091, 41002, 41004})
# No API permission / untrusted IP / IP not allowed.
PERMISSION_ERRCODES = frozenset({48002, 60020, 60011})
# kf session state: sending not allowed in this state (95018), transition not allowed (95016), ended (95013).
KF_STATE_ERRCODES = frozenset({95013, 95016, 95018})
# Quotas: kf 5 messages per customer message (95001), 48 h window (95002), frequency and concurrency limits.
QUOTA_ERRCODES = frozenset({95001, 95002, FREQUENCY_LIMIT, CONCURRENCY_LIMIT})
# Group robot: bad webhook url / robot removed, robot disabled, robot not in the group (reference §5.3).
ROBOT_ERRCODES = frozenset({93000, 93004, 93008})


class WeComError(Exception):
    """Base of every error raised by the WeCom clients."""

    @property
    def retryable(self) -> bool:
        return False


class WeComApiError(WeComError):
    """WeCom answered with a non-zero errcode."""

    def __init__(self, errcode: int, errmsg: str, path: str) -> None:
        self.errcode = errcode
        self.errmsg = errmsg
        self.path = path
        # True when an earlier try of the same call failed in transit, so WeCom may already have acted on it.
        self.after_uncertain_attempt = False
        super().__init__(f"{path}: errcode={errcode} errmsg={errmsg}")

    @property
    def retryable(self) -> bool:
        """Whether a later identical call may succeed (system busy, frequency or concurrency limits)."""
        return self.errcode in RETRYABLE_ERRCODES

    @property
    def token_invalid(self) -> bool:
        """The access token was rejected: refresh it and retry once."""
        return self.errcode in TOKEN_ERRCODES

    def __reduce__(self) -> tuple[type[WeComApiError], tuple[int, str, str]]:
        return (type(self), (self.errcode, self.errmsg, self.path))


class AccessTokenError(WeComApiError):
    """The access token was invalid, expired or missing, even after one refresh (40014, 42001, 41001)."""


class CredentialError(WeComApiError):
    """gettoken rejected the corp id or secret (40001, 40013, ...): fix the configuration; never retried."""


class PermissionDeniedError(WeComApiError):
    """No API permission (48002) or the caller IP is not trusted (60020)."""


class KfStateError(WeComApiError):
    """The kf session state does not allow this (95018 cannot send, 95016 bad transition, 95013 ended)."""


class QuotaError(WeComApiError):
    """A quota or rate limit (kf 95001 / 95002, frequency 45009, concurrency 45033)."""


class RobotError(WeComApiError):
    """The group robot webhook is invalid, removed, disabled or not in the group (93000, 93004, 93008)."""


def api_error(errcode: int, errmsg: str, path: str) -> WeComApiError:
    """The most specific error class for an errcode."""
    cls: type[WeComApiError] = WeComApiError
    if errcode in TOKEN_ERRCODES:
        cls = AccessTokenError
    elif errcode in CREDENTIAL_ERRCODES:
        cls = CredentialError
    elif errcode in PERMISSION_ERRCODES:
        cls = PermissionDeniedError
    elif errcode in KF_STATE_ERRCODES:
        cls = KfStateError
    elif errcode in QUOTA_ERRCODES:
        cls = QuotaError
    elif errcode in ROBOT_ERRCODES:
        cls = RobotError
    return cls(errcode, errmsg, path)


class WeComTransportError(WeComError):
    """The call did not produce a WeCom answer: timeout, connection error, HTTP error status or a bad body.

    `status` is the HTTP status when there was one. Timeouts, connection errors, HTTP 429 and 5xx are
    retryable.
    """

    def __init__(self, path: str, reason: str, *, status: int | None = None, retryable: bool = True) -> None:
        self.path = path
        self.reason = reason
        self.status = status
        self._retryable = retryable
        where = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{path}: {reason}{where}")

    @property
    def retryable(self) -> bool:
        return self._retryable

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_transport_error, (self.path, self.reason, self.status, self._retryable))


def _rebuild_transport_error(
    path: str, reason: str, status: int | None, retryable: bool
) -> WeComTransportError:
    return WeComTransportError(path, reason, status=status, retryable=retryable)


class TokenRefreshTimeout(WeComError):
    """Waited too long for another process to refresh the access token."""

    @property
    def retryable(self) -> bool:
        return True
